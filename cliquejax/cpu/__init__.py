"""The XLA:CPU kernels: the same network, written for XLA's CPU backend.

Every function here computes what its reference in `cliquejax.ops` computes (same values
and gradients, tests/cpu/test_kernels.py; dropout the same distribution); only the program
XLA:CPU is given changes. `config.train.kernels` chooses them (`cliquejax.kernels`: by
default only when JAX runs on the CPU); nothing outside `cliquejax.kernels` and
`cliquejax.platform` imports this package, so a fork for accelerators may delete it.

- `conv`: stride-1 bfloat16 convolutions as bfloat16 matrix products (XLA:CPU computes a
  bfloat16 convolution in float32), and 1x1 kernel gradients as one product.
- `ops`: BatchNorm-ReLU and max pooling with written-out gradients, remat residuals saved
  as integer bits, dropout from an integer hash; `ops.OPS` is the namespace the models take,
  `ops.REMAT` the CPU's `train.remat=auto`.
- `platform`: XLA:CPU flags, the restart with transparent huge pages, and the compiler
  options of the initial state.

Importing this package itself loads nothing (the launcher reads `platform` before JAX).
"""
