"""Pure building blocks shared by every model, in stock JAX operations: batch norm with
explicit statistics, convolution, dropout and pooling. Parameters and statistics are plain
pytrees (`{"scale", "bias"}` and `{"mean", "var"}`), so the clique functions stay pure.

The operations whose implementation may change with the backend (convolution, BatchNorm,
max pooling, the naming of values kept by rematerialisation, the gradient norm) reach the
models through a `Kernels` namespace: `REFERENCE` here, the XLA:CPU one in `cliquejax/cpu/`,
chosen by `config.train.kernels` (`cliquejax.kernels`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.ad_checkpoint import checkpoint_name

from cliquejax import names


@dataclasses.dataclass(frozen=True)
class BNSpec:
    """How a model's BatchNorm behaves, as in the framework of its original code.

    momentum: running = momentum * running + (1 - momentum) * batch statistic.
    epsilon: added to the variance before the inverse square root.
    unbiased_running_var: the running variance takes the batch variance with Bessel's
      correction, n / (n - 1) for n values per channel (PyTorch's `nn.BatchNorm2d`); the
      normalisation in training uses the biased batch variance in both frameworks.
    """

    momentum: float = 0.999
    epsilon: float = 1e-3
    unbiased_running_var: bool = False


# The CIFAR CliqueNet's original TensorFlow code: batch_norm with decay 0.999, epsilon 1e-3.
TF_BN = BNSpec(momentum=0.999, epsilon=1e-3, unbiased_running_var=False)
# PyTorch `nn.BatchNorm2d` defaults (momentum 0.1 keeps 0.9, eps 1e-5, unbiased running var):
# the authors' ImageNet CliqueNet and MBCliqueNet ("We implement our models in the Pytorch
# platform", MBCliqueNet section 3.1).
TORCH_BN = BNSpec(momentum=0.9, epsilon=1e-5, unbiased_running_var=True)
BN_MOMENTS = "bn_moments"
CLIQUE_1X1 = "clique_1x1"  # a bottleneck layer's 1x1 clique conv output (k channels)
# What `jax.checkpoint` keeps when the backward pass rematerialises (config.train.remat):
# each BN's two per-channel batch sums, so the recomputation redoes no reduction;
# with remat=layer_keep_1x1 also the 1x1 conv outputs, so it redoes no convolution.
REMAT_SAVED = jax.checkpoint_policies.save_only_these_names(BN_MOMENTS)
REMAT_SAVED_WITH_1X1 = jax.checkpoint_policies.save_only_these_names(BN_MOMENTS, CLIQUE_1X1)


def bn_params(channels: int) -> dict:
    return {names.SCALE: jnp.ones((channels,)), names.BIAS: jnp.zeros((channels,))}


def bn_stats(channels: int) -> dict:
    return {names.MEAN: jnp.zeros((channels,)), names.VAR: jnp.ones((channels,))}


def batch_moments(x, name=checkpoint_name):
    """Per-channel batch mean and variance of `x` (float32) over all but the last axis.

    The two sums are named (`name(value, BN_MOMENTS)`, `jax.ad_checkpoint.checkpoint_name` by
    default) so that rematerialisation keeps these vectors instead of recomputing two
    reductions over x (`REMAT_SAVED`). Under `jit` with a sharded batch they are
    cross-device reductions: the statistics are those of the whole (global) batch."""
    x32 = x.astype(jnp.float32)
    axes, count = tuple(range(x.ndim - 1)), math.prod(x.shape[:-1])
    mean = name(jnp.sum(x32, axes), BN_MOMENTS) / count
    mean_square = name(jnp.sum(jnp.square(x32), axes), BN_MOMENTS) / count
    return mean, jnp.maximum(mean_square - jnp.square(mean), 0.0)


def statistics(x, stats, train: bool, bn: BNSpec, name=checkpoint_name):
    """(mean, var, new running stats): the batch's in training, the running ones otherwise."""
    if not train:
        return stats["mean"], stats["var"], stats
    mean, var = batch_moments(x, name)
    count = math.prod(x.shape[:-1])
    running_var = var * (count / max(count - 1, 1)) if bn.unbiased_running_var else var
    m = bn.momentum
    return mean, var, {"mean": m * stats["mean"] + (1 - m) * mean,
                       "var": m * stats["var"] + (1 - m) * running_var}


def normalize(x, mean, var, scale, bias, epsilon):
    """(x - mean) * rsqrt(var + eps) * scale + bias per channel, in float32."""
    return (x.astype(jnp.float32) - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias


def batch_norm(x, params, stats, train: bool, bn: BNSpec = TF_BN, name=checkpoint_name):
    """Per-channel BN over all but the last axis (Ioffe & Szegedy 2015): the batch statistics
    in training, the running ones otherwise. Returns (y, new_stats)."""
    mean, var, new_stats = statistics(x, stats, train, bn, name)
    y = normalize(x, mean, var, params["scale"], params["bias"], bn.epsilon)
    return y.astype(x.dtype), new_stats


def bn_relu(x, params, stats, train: bool, bn: BNSpec = TF_BN):
    """ReLU(batch_norm(x)), the pre-activation of every CliqueNet layer (CliqueNet, CVPR
    2018: BN-ReLU-conv, after DenseNet). Returns (y, new_stats)."""
    y, new_stats = batch_norm(x, params, stats, train, bn)
    return jax.nn.relu(y), new_stats


def conv2d(x, kernel, stride: int = 1, padding: str | tuple = "SAME", dtype=None):
    """NHWC x HWIO convolution. `dtype` (e.g. bfloat16) casts both operands; the result
    is returned in that dtype."""
    if dtype is not None:
        x, kernel = x.astype(dtype), kernel.astype(dtype)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def dropout(x, rate: float, rng, train: bool):
    """Element-wise dropout (inverted scaling), active only in training with rate > 0.

    `rng` is a PRNG key or a uint32 seed from `dropout_seed` / `fold_seed`. The keep mask
    comes from `dropout_bits`, a counter-based hash that XLA fuses into the masking: on
    every backend a handful of integer operations per element, where threefry
    (`jax.random.bernoulli`) costs several rounds of them and cost a CliqueNet training step
    on CPU a large part of its speed (benchmarks/README.md)."""
    if not train or rate == 0.0:
        return x
    threshold = min(int(round(rate * 2.0**32)), 2**32 - 1)
    keep = dropout_bits(rng, x.shape) >= jnp.uint32(threshold)
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros_like(x))


def _lowbias32(h):
    """C. Wellons' `lowbias32` integer hash (uint32 -> uint32, a bijection)."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
    h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


_WEYL = 0x9E3779B9  # 2^32 / golden ratio


def dropout_seed(rng) -> jax.Array:
    """A uint32 seed: `rng` itself if it already is one, else one draw from the key."""
    rng = jnp.asarray(rng)
    if rng.ndim == 0 and rng.dtype == jnp.uint32:
        return rng
    return jax.random.bits(rng, (), jnp.uint32)


def fold_seed(seed, data) -> jax.Array:
    """A new seed for stream `data` (an int, static or traced) of `seed`: the integer hash
    of both, a few scalar integer operations. `jax.random.fold_in` does the same with
    threefry, whose scalar kernels were half of the compiled program's fusions for
    CliqueNet k=36 T=12 on CPU (four per layer)."""
    stream = _lowbias32(jnp.asarray(data, jnp.uint32) * jnp.uint32(_WEYL) + jnp.uint32(1))
    return _lowbias32(dropout_seed(seed) ^ stream)


def dropout_bits(rng, shape) -> jax.Array:
    """Uniform uint32 bits of `shape` for the key or seed `rng`: each element's flat index
    passed through a Weyl step offset by the seed and the `lowbias32` integer hash. Same
    seed, same bits; on any sharding, the same bits as unsharded (they depend only on the
    index)."""
    size = math.prod(shape)
    if size >= 2**32:
        raise ValueError(f"dropout over {size} elements: at most 2**32 - 1 are allowed")
    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    return _lowbias32(index * jnp.uint32(_WEYL) + dropout_seed(rng))


def avg_pool(x, size: int = 2):
    window = (1, size, size, 1)
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, "VALID")
    return summed / (size * size)


def max_pool(x, size: int = 3, stride: int = 2):
    """Max pooling with padding size // 2 (the 3x3/2 of the ImageNet stem in the authors'
    PyTorch CliqueNet). JAX's gradient goes to the first maximum of each window in row-major
    order, as PyTorch's does."""
    pad = ((0, 0), (size // 2, size // 2), (size // 2, size // 2), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, stride, stride, 1), pad
    )


def global_avg_pool(x):
    return jnp.mean(x, axis=(1, 2))


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The operations a model runs whose implementation may depend on the backend, with the
    signatures of the functions of this module. A model takes one as a field (as Flax's
    examples pass `conv` and `norm` modules in), so that its math does not ask which
    backend it runs on: `REFERENCE` below, or `cliquejax.cpu.KERNELS`.

    saved_name(x, name): `x` tagged for remat policies (`jax.checkpoint` saves it by name).
    global_norm(tree): the gradient's L2 norm (a training-step metric, and the finite check).
    init_compiler_options: (key, value) pairs for compiling the initial state, computed once.
    """

    name: str
    conv2d: Callable
    batch_norm: Callable
    bn_relu: Callable
    max_pool: Callable
    saved_name: Callable
    global_norm: Callable
    init_compiler_options: tuple = ()


REFERENCE = Kernels(name="reference", conv2d=conv2d, batch_norm=batch_norm, bn_relu=bn_relu,
                    max_pool=max_pool, saved_name=checkpoint_name, global_norm=optax.global_norm)
