"""Pure building blocks shared by every model, in stock JAX operations: batch norm with
explicit statistics, convolution, dropout and pooling. Parameters and statistics are plain
pytrees (`{"scale", "bias"}` and `{"mean", "var"}`), so the clique functions stay pure.

The operations whose implementation may change with the backend (convolution, BatchNorm,
max pooling, dropout) reach the models through an `Ops` namespace: `REFERENCE` here, the
XLA:CPU one in `cliquejax/cpu/`, chosen by `config.train.kernels` (`cliquejax.kernels`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
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


def conv2d(x, kernel, stride: int = 1, padding: str | tuple = "SAME", dtype=None,
           name: str | None = None):
    """NHWC x HWIO convolution. `dtype` (e.g. bfloat16) casts both operands; the result
    is returned in that dtype. `name` tags the result for remat policies (`CLIQUE_1X1`)."""
    if dtype is not None:
        x, kernel = x.astype(dtype), kernel.astype(dtype)
    y = jax.lax.conv_general_dilated(x, kernel, window_strides=(stride, stride),
                                     padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if name is None else checkpoint_name(y, name)


def dropout(x, rate: float, rng, train: bool):
    """Element-wise dropout (inverted scaling), active only in training with rate > 0; the
    keep mask is `jax.random.bernoulli` of the key `rng`."""
    if not train or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros_like(x))


def fold_in(rng, *data):
    """The key of stream `data` (ints, static or traced) of `rng`, one `jax.random.fold_in`
    per item; with no data, `rng` itself (the form a block passes to its layers)."""
    for item in data:
        rng = jax.random.fold_in(rng, item)
    return rng


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
class Ops:
    """The operations a model runs whose implementation may depend on the backend, with the
    signatures of the functions of this module. A model takes one as a field (as Flax's
    examples pass `conv` and `norm` modules in), so that its math does not ask which
    backend it runs on: `REFERENCE` below, or `cliquejax.cpu.ops.OPS`.

    fold_in(rng, *data): the dropout rng of stream `data`; `dropout` takes what it returns.
    """

    name: str
    conv2d: Callable
    batch_norm: Callable
    bn_relu: Callable
    max_pool: Callable
    dropout: Callable
    fold_in: Callable


REFERENCE = Ops(name="reference", conv2d=conv2d, batch_norm=batch_norm, bn_relu=bn_relu,
                max_pool=max_pool, dropout=dropout, fold_in=fold_in)
