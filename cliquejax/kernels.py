"""Which implementation of the network's operations runs, and what the backward pass
recomputes: the one place that chooses per backend.

`config.train.kernels`:
- `reference`: stock JAX operations (`lax.conv_general_dilated`, jnp BatchNorm and ReLU,
  `lax.reduce_window` pooling, JAX's own derivatives, Optax's per-parameter updates). The
  program every backend can run, and what a GPU or TPU compiles.
- `cpu`: the XLA:CPU kernels of `cliquejax/cpu/` (convolutions as bfloat16 matrix products,
  written-out gradients, remat values saved as bits, ...). Same values and gradients.
- `auto` (default): `cpu` when JAX's default backend is the CPU and `cliquejax/cpu/` is
  present, else `reference`.

The models take the chosen namespace (`namespace(...)`, an `ops.Ops`) as their `ops` field,
so that the math never asks which backend it runs on.

`config.train.remat` (`remat`): `auto` (default) is `cliquejax.cpu.ops.REMAT` when JAX's
default backend is the CPU and `cliquejax/cpu/` is present, else `none`; any other value of
`clique.REMAT_POLICIES` is taken as it is.

`config.train.compute_dtype` (`compute_dtype`): `auto` (default) is `bfloat16` on a GPU or
TPU, whose tensor cores / MXUs run bfloat16 at twice the float32 (TF32) rate and move half
the bytes, and `float32` on the CPU; parameters, optimizer state, BatchNorm statistics and
the loss stay float32 either way.

Only this module and `cliquejax.platform` import `cliquejax.cpu`, and only when it is chosen:
a fork without that folder keeps a working codebase.
"""

from __future__ import annotations

import importlib
import importlib.util

KERNEL_CHOICES = ("auto", "reference", "cpu")
CPU_PACKAGE = "cliquejax.cpu"


def cpu_kernels_present() -> bool:
    """Whether the `cliquejax/cpu/` package exists (a fork for accelerators may delete it)."""
    return importlib.util.find_spec(CPU_PACKAGE) is not None


def _cpu_ops():
    return importlib.import_module(f"{CPU_PACKAGE}.ops")


def resolve_name(choice: str, backend: str | None = None) -> str:
    """`reference` or `cpu` for a `train.kernels` value; `backend` (default: JAX's default
    backend, read only for `auto`) is the platform the program is built for."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"train.kernels={choice!r} is not one of: {', '.join(KERNEL_CHOICES)}")
    if choice != "auto":
        return choice
    if backend is None:
        import jax

        backend = jax.default_backend()
    return "cpu" if backend == "cpu" and cpu_kernels_present() else "reference"


def resolve(config, backend: str | None = None) -> str:
    """`reference` or `cpu`: `config.train.kernels` (auto | reference | cpu; auto when the
    config has no such field), `auto` resolved for `backend` (default: JAX's default)."""
    train = config.get("train") if hasattr(config, "get") else None
    choice = train.get("kernels", "auto") if train is not None else "auto"
    return resolve_name(choice, backend)


def namespace(name: str):
    """The operations namespace (`ops.Ops`) of a resolved choice."""
    if name == "reference":
        from cliquejax import ops

        return ops.REFERENCE
    if name == "cpu":
        if not cpu_kernels_present():
            raise ValueError("train.kernels='cpu' needs the cliquejax/cpu/ package, which is "
                             "not installed; allowed: auto, reference")
        return _cpu_ops().OPS
    raise ValueError(f"kernels {name!r} is not one of: reference, cpu")


def for_config(config, backend: str | None = None):
    """The operations namespace `config.train.kernels` resolves to."""
    return namespace(resolve(config, backend))


def global_norm(tree):
    """`optax.tree.norm` as one reduction over the concatenated leaves: one kernel, not one
    per parameter (XLA fuses the concatenation into the reduction). Only the order of the
    float32 sum differs from Optax's."""
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    flat = ravel_pytree(tree)[0].astype(jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(flat)))


def grad_norm(model):
    """The training step's gradient norm for `model`: `global_norm` on every backend. With
    the CPU kernels it is how XLA:CPU compiled the step's gradients before Optax's norm was
    offered, so CPU runs keep their parameters to the bit; on accelerators it is one kernel
    instead of one per parameter."""
    del model  # the same for every model and kernels; kept for the callers
    return global_norm


def compute_dtype(choice: str, backend: str | None = None) -> str:
    """`float32` or `bfloat16` for a `train.compute_dtype` value: `auto` resolved for
    `backend` (default: JAX's default backend; `cuda`, `rocm`, `gpu` and `tpu` compute in
    bfloat16, the CPU in float32); any other value as it is."""
    if choice != "auto":
        return choice
    if backend is None:
        import jax

        backend = jax.default_backend()
    return "float32" if backend == "cpu" else "bfloat16"


def remat(choice: str, backend: str | None = None) -> str:
    """The remat policy for a `train.remat` value: `auto` resolved for `backend` (default:
    JAX's default backend) as `train.kernels=auto` is: the CPU kernels' policy where they
    are chosen, else none; any other value as it is."""
    if choice != "auto":
        return choice
    return _cpu_ops().REMAT if resolve_name("auto", backend) == "cpu" else "none"
