"""XLA:CPU versions of the backend-dependent operations of `cliquejax.ops`, and `OPS`, the
namespace that hands them to the models. Each equals its reference in values and gradients
(tests/cpu/test_kernels.py; dropout in distribution, tests/cpu/test_dropout.py); they differ
in the program XLA:CPU compiles."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from cliquejax import kernels, ops
from cliquejax.cpu import conv

# ----------------------------------------------------------------------------- remat names


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


# ----------------------------------------------------------------------------- BatchNorm


def batch_norm(x, params, stats, train: bool, bn: ops.BNSpec = ops.TF_BN):
    """`ops.batch_norm` with its batch sums saved as bits (`saved_name`)."""
    return ops.batch_norm(x, params, stats, train, bn, name=saved_name)


def bn_relu(x, params, stats, train: bool, bn: ops.BNSpec = ops.TF_BN):
    """`ops.bn_relu` with the written-out gradient of `normalize_relu`."""
    mean, var, new_stats = ops.statistics(x, stats, train, bn, saved_name)
    return normalize_relu(x, mean, var, params["scale"], params["bias"], bn.epsilon), new_stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def normalize_relu(x, mean, var, scale, bias, epsilon):
    """ReLU((x - mean) * rsqrt(var + eps) * scale + bias) per channel (the last axis).

    Its gradient is written out (the BatchNorm gradient of Ioffe & Szegedy 2015, section 3,
    through the batch statistics). With r = rsqrt(var + eps), g = dy where the output is
    positive, and two per-channel sums G1 = sum(g), G2 = sum(g * (x - mean)): dx = g r scale,
    d_mean = -r scale G1, d_var = -scale r^3 G2 / 2, d_scale = r G2, d_bias = G1. JAX's own
    derivative of the same expression took three reductions and kept x - mean and g r scale
    as full tensors, which XLA:CPU runs as two more kernels and two more passes over the
    layer input per BN in the backward pass."""
    return _normalize_relu_fwd(x, mean, var, scale, bias, epsilon)[0]


def _normalize_relu_fwd(x, mean, var, scale, bias, epsilon):
    y = jax.nn.relu(ops.normalize(x, mean, var, scale, bias, epsilon))
    return y.astype(x.dtype), (x, mean, var, scale, bias)


def _normalize_relu_bwd(epsilon, residuals, dy):
    x, mean, var, scale, bias = residuals
    axes = tuple(range(x.ndim - 1))
    r = jax.lax.rsqrt(var + epsilon)
    g = jnp.where(ops.normalize(x, mean, var, scale, bias, epsilon) > 0,
                  dy.astype(jnp.float32), 0.0)
    g1 = jnp.sum(g, axes)
    # sum(g * (x - mean)) without an x - mean tensor
    g2 = jnp.sum(g * x.astype(jnp.float32), axes) - mean * g1
    dx = (g * (r * scale)).astype(x.dtype)
    return dx, -r * scale * g1, -0.5 * scale * r**3 * g2, r * g2, g1


normalize_relu.defvjp(_normalize_relu_fwd, _normalize_relu_bwd)

# ----------------------------------------------------------------------------- convolution


def conv2d(x, kernel, stride: int = 1, padding: str | tuple = "SAME", dtype=None,
           name: str | None = None):
    """`ops.conv2d` for XLA:CPU. Stride-1 bfloat16 convolutions (but RGB stems) run as
    bfloat16 matrix products (`conv.conv2d_matmul`): XLA's CPU backend computes a bfloat16
    convolution in float32. Other 1x1 stride-1 convolutions take their kernel gradient from
    one dot (`conv.pointwise_conv`). A `name`d result is saved as bits (`saved_name`)."""
    bf16 = dtype is not None and jnp.dtype(dtype) == jnp.bfloat16
    if bf16 and stride == 1 and conv.matmul_pays(kernel.shape):
        y = conv.conv2d_matmul(x, kernel, padding, dtype)
    else:
        if dtype is not None:
            x, kernel = x.astype(dtype), kernel.astype(dtype)
        if kernel.shape[:2] == (1, 1) and stride == 1 and padding in ("SAME", "VALID"):
            y = conv.pointwise_conv(x, kernel)
        else:
            y = ops.conv2d(x, kernel, stride, padding)
    return y if name is None else saved_name(y, name)


# ----------------------------------------------------------------------------- max pooling


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x, size: int = 3, stride: int = 2):
    """`ops.max_pool` whose gradient (to the first maximum of each window in row-major
    order, as XLA's own and PyTorch's) is computed with strided slices and pads, which
    XLA:CPU runs several times faster than its select-and-scatter."""
    return ops.max_pool(x, size, stride)


def _max_pool_fwd(x, size, stride):
    y = ops.max_pool(x, size, stride)
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

# ----------------------------------------------------------------------------- dropout


def dropout(x, rate: float, rng, train: bool):
    """`ops.dropout` with the keep mask from `dropout_bits`, a counter-based hash that XLA
    fuses into the masking: a handful of integer operations per element, where threefry
    (`jax.random.bernoulli`) costs several rounds of them and cost a CliqueNet training step
    on CPU a large part of its speed (benchmarks/README.md). `rng` is a PRNG key or a uint32
    seed from `fold_in`."""
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


def fold_in(rng, *data) -> jax.Array:
    """`ops.fold_in` on a uint32 seed (`dropout_seed`): the integer hash of the seed and each
    stream number, a few scalar integer operations. `jax.random.fold_in` does the same with
    threefry, whose scalar kernels were half of the compiled program's fusions for
    CliqueNet k=36 T=12 on CPU (four per layer)."""
    seed = dropout_seed(rng)
    for item in data:
        stream = _lowbias32(jnp.asarray(item, jnp.uint32) * jnp.uint32(_WEYL) + jnp.uint32(1))
        seed = _lowbias32(seed ^ stream)
    return seed


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


# ----------------------------------------------------------------------------- training step


global_norm = kernels.global_norm  # the training step's (`kernels.grad_norm`)


OPS = ops.Ops(name="cpu", conv2d=conv2d, batch_norm=batch_norm, bn_relu=bn_relu,
              max_pool=max_pool, dropout=dropout, fold_in=fold_in)
# `config.train.remat=auto` on the CPU (`cliquejax.kernels.remat`): recomputing each layer
# was both faster and far smaller than keeping everything (benchmarks/README.md).
REMAT = "layer"
