"""The parameter and variable names that code matches on, defined once.

The layers and models that create parameters take their names from here, and so does every
piece of code that selects parameters by name: weight decay on kernels
(`train/optim.py`), the M-filter step of the alternating update (`train/step.py`), the
storage report (`summary`, `models/mbcliquenet.py`).
"""

from __future__ import annotations

import jax

# Variable collections.
PARAMS = "params"
BATCH_STATS = "batch_stats"
BITS = "bits"  # storage bits of quantized weights, at their parameter paths (`cliquejax.bits`)

# Convolution and dense weights (`layers.Conv`, `layers.BinaryConv`, `flax.linen.Dense`).
KERNEL = "kernel"
# BatchNorm: parameters {SCALE, BIAS} and statistics {MEAN, VAR}; BIAS is also a dense bias.
SCALE = "scale"
BIAS = "bias"
MEAN = "mean"
VAR = "var"
# A clique block's kernel pieces all start with CLIQUE_KERNEL_PREFIX (CliqueNet, section 3.1:
# W_ij from layer i to layer j; the paper's notation, kept in the parameter names).
CLIQUE_KERNEL_PREFIX = "W_"
BOTTLENECK_KERNEL_PREFIX = "W_bottleneck_"
# MBCliqueNet: each block's modulation filter M (K, w, w), shared by its modulated convs.
M_FILTER = "M_filter"


def clique_kernel(j: int, i: int) -> str:
    """The kernel piece from layer j (0: the block input) to layer i of a clique block."""
    return f"{CLIQUE_KERNEL_PREFIX}{j}to{i}"


def bottleneck_kernel(i: int) -> str:
    """Layer i's 3x3 conv after its 1x1 clique conv (bottleneck blocks; latent filters of the
    modulated 3x3 conv in MBCliqueNet)."""
    return f"{BOTTLENECK_KERNEL_PREFIX}{i}"


def stage_two_kernel(name: str) -> str:
    """The Stage-II copy of kernel `name` (`clique_kernel` or `bottleneck_kernel`), for blocks
    whose stages do not share it: W_II_{j}to{i}, W_bottleneck_II_{i}."""
    prefix = (BOTTLENECK_KERNEL_PREFIX if name.startswith(BOTTLENECK_KERNEL_PREFIX)
              else CLIQUE_KERNEL_PREFIX)
    return f"{prefix}II_{name.removeprefix(prefix)}"


def path_string(path) -> str:
    """A pytree path (`jax.tree_util.tree_map_with_path`) as one name per level, whatever the
    container type: `opt_state/0/trace/conv/kernel`."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def leaf_name(path) -> str:
    """The last key of a pytree path, as a string."""
    return path_string(tuple(path)[-1:])


def is_kernel(name: str) -> bool:
    """A convolution or dense kernel, a clique kernel piece or an M-filter: what
    `optimizer.weight_decay_on="kernels"` decays (not BN parameters or biases)."""
    return name in (KERNEL, M_FILTER) or name.startswith(CLIQUE_KERNEL_PREFIX)


def is_kernel_path(path) -> bool:
    """`is_kernel` of the leaf at a pytree `path` (the conv filters `summary` counts)."""
    return is_kernel(leaf_name(path))

