"""Pure building blocks shared by every model: batch norm with explicit statistics,
convolution, dropout and pooling. Parameters and statistics are plain pytrees
(`{"scale", "bias"}` and `{"mean", "var"}`), so the clique functions stay pure."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from cliquejax import conv


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
# platform", MBCliqueNet section 4).
TORCH_BN = BNSpec(momentum=0.9, epsilon=1e-5, unbiased_running_var=True)
BN_MOMENTS = "bn_moments"
CLIQUE_1X1 = "clique_1x1"  # a bottleneck layer's 1x1 clique conv output (k channels)
# What `jax.checkpoint` keeps when the backward pass rematerialises (config.train.remat):
# each BN's two per-channel batch sums, so the recomputation redoes no reduction;
# with remat=layer_keep_1x1 also the 1x1 conv outputs, so it redoes no convolution.
REMAT_SAVED = jax.checkpoint_policies.save_only_these_names(BN_MOMENTS)
REMAT_SAVED_WITH_1X1 = jax.checkpoint_policies.save_only_these_names(BN_MOMENTS, CLIQUE_1X1)


def _named_bits(x, name: str):
    if x.dtype != jnp.float32:
        return checkpoint_name(x, name)
    bits = checkpoint_name(jax.lax.bitcast_convert_type(x, jnp.uint32), name)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def saved_name(x, name: str):
    """`checkpoint_name(x, name)` without the copy. JAX passes every saved floating-point
    residual through `reduce_precision` to its own format (jax PR 22244), the identity for
    float32, which XLA:CPU keeps as a kernel of its own wherever the producer cannot absorb
    it (a convolution, a reduction): a full copy of each kept 1x1 conv output. A float32
    residual is therefore saved as its uint32 bits: the same value, and the derivative of
    the identity (a bitcast alone would have none)."""
    return _named_bits(x, name)


@saved_name.defjvp
def _saved_name_jvp(name, primals, tangents):
    # the name must be traced here, outside the custom_jvp call, for remat policies to see it
    return _named_bits(primals[0], name), tangents[0]


def bn_params(channels: int) -> dict:
    return {"scale": jnp.ones((channels,)), "bias": jnp.zeros((channels,))}


def bn_stats(channels: int) -> dict:
    return {"mean": jnp.zeros((channels,)), "var": jnp.ones((channels,))}


def batch_moments(x):
    """Per-channel batch mean and variance of `x` (float32) over all but the last axis.

    The two sums are named so that rematerialisation keeps these vectors instead of
    recomputing two reductions over x (`REMAT_SAVED`). Under `jit` with a sharded batch they
    are cross-device reductions: the statistics are those of the whole (global) batch."""
    x32 = x.astype(jnp.float32)
    axes, count = tuple(range(x.ndim - 1)), math.prod(x.shape[:-1])
    mean = saved_name(jnp.sum(x32, axes), BN_MOMENTS) / count
    mean_square = saved_name(jnp.sum(jnp.square(x32), axes), BN_MOMENTS) / count
    return mean, jnp.maximum(mean_square - jnp.square(mean), 0.0)


def _statistics(x, stats, train: bool, bn: BNSpec):
    """(mean, var, new running stats): the batch's in training, the running ones otherwise."""
    if not train:
        return stats["mean"], stats["var"], stats
    mean, var = batch_moments(x)
    count = math.prod(x.shape[:-1])
    running_var = var * (count / max(count - 1, 1)) if bn.unbiased_running_var else var
    m = bn.momentum
    return mean, var, {"mean": m * stats["mean"] + (1 - m) * mean,
                       "var": m * stats["var"] + (1 - m) * running_var}


def _normalize(x, mean, var, scale, bias, epsilon):
    """(x - mean) * rsqrt(var + eps) * scale + bias per channel, in float32."""
    return (x.astype(jnp.float32) - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias


def batch_norm(x, params, stats, train: bool, bn: BNSpec = TF_BN):
    """Per-channel BN over all but the last axis. Returns (y, new_stats)."""
    mean, var, new_stats = _statistics(x, stats, train, bn)
    y = _normalize(x, mean, var, params["scale"], params["bias"], bn.epsilon)
    return y.astype(x.dtype), new_stats


def bn_relu(x, params, stats, train: bool, bn: BNSpec = TF_BN):
    """ReLU(batch_norm(x)), with the written-out gradient of `normalize_relu`.
    Returns (y, new_stats)."""
    mean, var, new_stats = _statistics(x, stats, train, bn)
    return normalize_relu(x, mean, var, params["scale"], params["bias"], bn.epsilon), new_stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def normalize_relu(x, mean, var, scale, bias, epsilon):
    """ReLU((x - mean) * rsqrt(var + eps) * scale + bias) per channel (the last axis).

    Its gradient is written out. With r = rsqrt(var + eps), g = dy where the output is
    positive, and two per-channel sums G1 = sum(g), G2 = sum(g * (x - mean)): dx = g r scale,
    d_mean = -r scale G1, d_var = -scale r^3 G2 / 2, d_scale = r G2, d_bias = G1. JAX's own
    derivative of the same expression took three reductions and kept x - mean and g r scale
    as full tensors: two kernels and two passes over the layer input more per BN in the
    backward pass (README, "Speed on CPU")."""
    return _normalize_relu_fwd(x, mean, var, scale, bias, epsilon)[0]


def _normalize_relu_fwd(x, mean, var, scale, bias, epsilon):
    y = jax.nn.relu(_normalize(x, mean, var, scale, bias, epsilon))
    return y.astype(x.dtype), (x, mean, var, scale, bias)


def _normalize_relu_bwd(epsilon, residuals, dy):
    x, mean, var, scale, bias = residuals
    axes = tuple(range(x.ndim - 1))
    r = jax.lax.rsqrt(var + epsilon)
    g = jnp.where(_normalize(x, mean, var, scale, bias, epsilon) > 0,
                  dy.astype(jnp.float32), 0.0)
    g1 = jnp.sum(g, axes)
    # sum(g * (x - mean)) without an x - mean tensor
    g2 = jnp.sum(g * x.astype(jnp.float32), axes) - mean * g1
    dx = (g * (r * scale)).astype(x.dtype)
    return dx, -r * scale * g1, -0.5 * scale * r**3 * g2, r * g2, g1


normalize_relu.defvjp(_normalize_relu_fwd, _normalize_relu_bwd)


def conv2d(x, kernel, stride: int = 1, padding: str | tuple = "SAME", dtype=None):
    """NHWC x HWIO convolution. `dtype` (e.g. bfloat16) casts both operands; the result
    is returned in that dtype. Stride-1 bfloat16 convolutions (but RGB stems) run as bfloat16
    matrix products (`conv.conv2d_matmul`): XLA's CPU backend computes a bfloat16
    convolution in float32. Other 1x1 stride-1 convolutions take their kernel gradient
    from one dot (`conv.pointwise_conv`)."""
    bf16 = dtype is not None and jnp.dtype(dtype) == jnp.bfloat16
    if bf16 and stride == 1 and conv.matmul_pays(kernel.shape):
        return conv.conv2d_matmul(x, kernel, padding, dtype)
    if dtype is not None:
        x, kernel = x.astype(dtype), kernel.astype(dtype)
    if kernel.shape[:2] == (1, 1) and stride == 1 and padding in ("SAME", "VALID"):
        return conv.pointwise_conv(x, kernel)
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
    comes from `dropout_bits`, a counter-based hash that XLA fuses into the masking: with
    `jax.random.bernoulli` (threefry) a CliqueNet k=36 T=12 training step on CPU ran at
    10.8 img/s, against 17.5 without dropout and 16.8 with this mask (README, "Speed on
    CPU")."""
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
    CliqueNet k=36 T=12 (four per layer)."""
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


def _max_pool_window(x, size: int, stride: int):
    pad = ((0, 0), (size // 2, size // 2), (size // 2, size // 2), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, stride, stride, 1), pad
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x, size: int = 3, stride: int = 2):
    """Max pooling with padding size // 2 (the ImageNet stem's 3x3/2). The gradient goes to
    the first maximum of each window in row-major order, as XLA's own and PyTorch's; it is
    computed with strided slices and pads, which XLA:CPU runs ~3x faster than its
    select-and-scatter (CliqueNet-S0 stem, batch 8: 130-157 -> 50 ms)."""
    return _max_pool_window(x, size, stride)


def _max_pool_fwd(x, size, stride):
    y = _max_pool_window(x, size, stride)
    return y, (x, y)


def _max_pool_bwd(size, stride, residuals, dy):
    x, y = residuals
    p, (out_h, out_w) = size // 2, y.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
    span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    taken = jnp.zeros(y.shape, bool)
    dx = jnp.zeros(padded.shape, dy.dtype)
    zero = jnp.zeros((), dy.dtype)
    for a in range(size):
        for b in range(size):  # window offset (a, b): input pixel (stride*i + a, stride*j + b)
            seen = jax.lax.slice(padded, (0, a, b, 0),
                                 (x.shape[0], a + span_h, b + span_w, x.shape[3]),
                                 (1, stride, stride, 1))
            first = (seen == y) & ~taken
            taken = taken | first
            dx = dx + jax.lax.pad(jnp.where(first, dy, zero), zero, (
                (0, 0, 0), (a, padded.shape[1] - a - span_h, stride - 1),
                (b, padded.shape[2] - b - span_w, stride - 1), (0, 0, 0)))
    return (dx[:, p:p + x.shape[1], p:p + x.shape[2], :],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def global_avg_pool(x):
    return jnp.mean(x, axis=(1, 2))
