"""The XLA:CPU kernels: the same network, written for XLA's CPU backend.

Every function here computes what its reference in `cliquejax.ops` / `cliquejax.train`
computes (same values and gradients, tests/test_kernels.py); only the program XLA:CPU is
given changes. `config.train.kernels` chooses them (`cliquejax.kernels`: by default only when
JAX runs on the CPU); nothing outside `cliquejax.kernels` and `cliquejax.platform` imports
this package, so a fork for accelerators may delete it.

- `conv`: stride-1 bfloat16 convolutions as bfloat16 matrix products (XLA:CPU computes a
  bfloat16 convolution in float32), and 1x1 kernel gradients as one product.
- `ops`: BatchNorm-ReLU and max pooling with written-out gradients, remat residuals saved
  as integer bits, the gradient norm in one reduction; `ops.KERNELS` is the namespace the
  models take.
- `platform`: XLA:CPU flags and the restart with transparent huge pages.

Importing this package itself loads nothing (the launcher reads `platform` before JAX).
"""
