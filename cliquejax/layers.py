"""Thin Flax Linen wrappers: they name and initialise parameters, the math lives in
`ops` and `clique` (pure functions). Modules that convolve or normalise take the operations
as a field, `ops` (`ops.Ops`, chosen by `config.train.kernels`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cliquejax import binary, bits, clique, names, ops

Initializer = Callable[..., jax.Array]

# CliqueNet's TensorFlow code: He init, fan-in per kernel piece, truncated normal
# (TF variance_scaling).
he_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
# The authors' PyTorch ImageNet CliqueNet: N(0, sqrt(2 / (kh * kw * out))).
he_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
xavier = nn.initializers.xavier_uniform()


def checkpointed(target, remat: str):
    """`target` (a module class, or a function `(module, x, train)`) rematerialised in the
    backward pass unless `remat` is "none" (`config.train.remat`). `train`, argument 2
    counting the module, stays static; mutable batch stats and dropout rngs are lifted."""
    return target if remat == "none" else nn.remat(target, static_argnums=(2,),
                                                   policy=ops.REMAT_SAVED)


def _bn_param_init(_, channels):
    return ops.bn_params(channels)


class BatchNorm(nn.Module):
    """BN as `bn` says (`ops.BNSpec`), then ReLU if `relu`; params {scale, bias},
    batch_stats {mean, var}."""

    bn: ops.BNSpec = ops.TF_BN
    relu: bool = False
    ops: ops.Ops = ops.REFERENCE

    @nn.compact
    def __call__(self, x, train: bool):
        shape = (x.shape[-1],)
        params = {names.SCALE: self.param(names.SCALE, nn.initializers.ones, shape),
                  names.BIAS: self.param(names.BIAS, nn.initializers.zeros, shape)}
        mean = self.variable(names.BATCH_STATS, names.MEAN, jnp.zeros, shape)
        var = self.variable(names.BATCH_STATS, names.VAR, jnp.ones, shape)
        norm = self.ops.bn_relu if self.relu else self.ops.batch_norm
        stats = {names.MEAN: mean.value, names.VAR: var.value}
        y, new_stats = norm(x, params, stats, train, self.bn)
        if train and self.is_mutable_collection(names.BATCH_STATS):
            mean.value, var.value = new_stats[names.MEAN], new_stats[names.VAR]
        return y


class Conv(nn.Module):
    """Bias-free NHWC convolution through `ops.conv2d`."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    kernel_init: Initializer = he_fan_in
    dtype: Any = None
    ops: ops.Ops = ops.REFERENCE

    @nn.compact
    def __call__(self, x):
        ks = self.kernel_size
        kernel = self.param(names.KERNEL, self.kernel_init, (ks, ks, x.shape[-1], self.features))
        pad = "SAME" if self.stride == 1 else [(ks // 2, (ks - 1) // 2)] * 2
        return self.ops.conv2d(x, kernel, self.stride, pad, self.dtype)


class Dropout(nn.Module):
    rate: float
    ops: ops.Ops = ops.REFERENCE

    @nn.compact
    def __call__(self, x, train: bool):
        if not train or self.rate == 0.0:
            return x
        return self.ops.dropout(x, self.rate, self.make_rng("dropout"), train)


class BNReLUConv(nn.Module):
    """BN -> ReLU -> conv -> dropout, the unit of transitions and compression."""

    features: int
    kernel_size: int = 1
    dropout_rate: float = 0.0
    kernel_init: Initializer = he_fan_in
    dtype: Any = None
    bn: ops.BNSpec = ops.TF_BN
    ops: ops.Ops = ops.REFERENCE

    @nn.compact
    def __call__(self, x, train: bool):
        y = BatchNorm(self.bn, relu=True, ops=self.ops, name="bn")(x, train)
        y = Conv(self.features, self.kernel_size, kernel_init=self.kernel_init, dtype=self.dtype,
                 ops=self.ops, name="conv")(y)
        return Dropout(self.dropout_rate, self.ops)(y, train)


class Attention(nn.Module):
    """Squeeze-excitation of the attentional transition (CliqueNet's `if_a` option)."""

    reduction: int = 2

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        dense = lambda n, name: nn.Dense(n, kernel_init=xavier, name=name)
        squeezed = ops.global_avg_pool(x).astype(jnp.float32)
        gate = nn.sigmoid(dense(channels, "expand")(nn.relu(
            dense(channels // self.reduction, "squeeze")(squeezed))))
        return x * gate[:, None, None, :].astype(x.dtype)


class Transition(nn.Module):
    """BN -> ReLU -> 1x1 conv C -> C -> dropout -> [attention] -> 2x2 average pool."""

    dropout_rate: float = 0.0
    attention: bool = False
    kernel_init: Initializer = he_fan_in
    dtype: Any = None
    bn: ops.BNSpec = ops.TF_BN
    ops: ops.Ops = ops.REFERENCE

    @nn.compact
    def __call__(self, x, train: bool):
        y = BNReLUConv(x.shape[-1], 1, self.dropout_rate, self.kernel_init, self.dtype,
                       self.bn, self.ops, name="unit")(x, train)
        if self.attention:
            y = Attention(name="attention")(y)
        return ops.avg_pool(y, 2)


class PooledFeature(nn.Module):
    """BN -> ReLU -> global average pool: one block's contribution to the multi-scale head."""

    bn: ops.BNSpec = ops.TF_BN
    ops: ops.Ops = ops.REFERENCE

    @nn.compact
    def __call__(self, x, train: bool):
        bn = BatchNorm(self.bn, relu=True, ops=self.ops, name="bn")
        return ops.global_avg_pool(bn(x, train))


class CliqueBlock(nn.Module):
    """Declares the parameters of `clique.param_layout(spec)` and runs `clique.clique_block`.
    Returns (block_feature, transit_feature)."""

    spec: clique.BlockSpec
    kernel_init: Initializer = he_fan_in

    def weights(self, shapes: dict[str, tuple]) -> dict:
        """The kernels the clique functions convolve with. Subclasses override this to keep
        latent parameters and transform them on use (see `ModulatedCliqueBlock`)."""
        return {name: self.param(name, self.kernel_init, shape) for name, shape in shapes.items()}

    @nn.compact
    def __call__(self, x, train: bool):
        layout = clique.param_layout(self.spec)
        params = self.weights({n: arg for n, (kind, arg) in layout.items() if kind == "kernel"})
        stats = {}
        for name, (kind, arg) in layout.items():
            if kind == "bn":
                params[name] = self.param(name, _bn_param_init, arg)
                stats[name] = self.variable(names.BATCH_STATS, name, ops.bn_stats, arg)
        use_rng = train and self.spec.dropout_rate > 0
        rng = self.make_rng("dropout") if use_rng else jax.random.PRNGKey(0)
        current = {name: v.value for name, v in stats.items()}
        block, transit, new_stats = clique.clique_block(params, current, x, rng, train, self.spec)
        if train and self.is_mutable_collection(names.BATCH_STATS):
            for name, variable in stats.items():
                variable.value = new_stats[name]
        return block, transit


# ----------------------------------------------------------------------------- binary


class BinaryConv(nn.Module):
    """A conv whose latent kernel is binarised on use (`quantize`, e.g. `binary.ste_sign`);
    `quantize=None` gives the full-precision conv with the same latent init."""

    features: int
    kernel_size: int = 3
    quantize: Callable | None = binary.ste_sign
    dtype: Any = None
    ops: ops.Ops = ops.REFERENCE

    @nn.compact
    def __call__(self, x):
        ks = self.kernel_size
        shape = (ks, ks, x.shape[-1], self.features)
        weight = quantized_param(self, names.KERNEL, binary.binary_kernel_init, shape,
                                 self.quantize)
        return self.ops.conv2d(x, binary_kernel(weight, self.quantize is not None), 1,
                                   "SAME", self.dtype)


def latent_init(std: float | None):
    if std is None:
        return binary.binary_kernel_init
    return lambda key, shape, dtype=jnp.float32: std * jax.random.normal(key, shape, dtype)


def quantized_param(module, name: str, init, shape, quantize: Callable | None):
    """Declares `module`'s latent parameter `name` and returns it as the forward pass uses it:
    `quantize(latent)` (e.g. sign(C)), or the latent itself when `quantize` is None. Records
    its storage (1 bit when quantized, else 32) in the `bits` collection at the same path:
    every binary weight is made here, so `summary` and `export` count exactly the weights
    the forward pass binarises (`cliquejax.bits`)."""
    latent = latent_param(module, name, init, shape, quantize is not None)
    return latent if quantize is None else quantize(latent)


def latent_param(module, name: str, init, shape, binarised: bool):
    """`quantized_param`'s latent parameter, declared and recorded, for a caller that
    transforms it itself (`transform_stacked`)."""
    latent = module.param(name, init, shape)
    bits.record(module, name, 1 if binarised else bits.FLOAT_BITS)
    return latent


def transform_stacked(latents: dict, transform: Callable) -> dict:
    """{name: transform(latent)} for a dict of latent weights, computed once per group of
    same-shaped ones: stacked, transformed (`jax.vmap`) and split again. The same numbers
    as one `transform` per weight (it is applied to each independently), in a few kernels
    of an accelerator's program instead of a chain per weight (benchmarks/README.md,
    issue 34); the parameters stay separate leaves."""
    groups: dict[tuple, list[str]] = {}
    for name, latent in latents.items():
        groups.setdefault(latent.shape, []).append(name)
    out = {}
    for group in groups.values():
        if len(group) == 1:
            out[group[0]] = transform(latents[group[0]])
            continue
        stacked = jax.vmap(transform)(jnp.stack([latents[name] for name in group]))
        out.update(zip(group, stacked, strict=True))
    return {name: out[name] for name in latents}


def binary_kernel(weight, binarised: bool):
    """sign(C) times the constant He std sqrt(2 / fan_in) (as the 1-bit WRN of McDonnell
    2018, the source's [14]): a 1-bit filter with the scale of a He-initialised one, at no
    storage cost; a full-precision `weight` is used as it is. Modulated convs need no
    constant: the M-filter carries the scale."""
    if not binarised:
        return weight
    fan_in = weight.shape[0] * weight.shape[1] * weight.shape[2]
    return weight * jnp.asarray((2.0 / fan_in) ** 0.5, weight.dtype)
