"""CliqueNet (Yang et al., CVPR 2018), CIFAR/SVHN model, as the
authors' TensorFlow code builds it.

The `CliqueNet` module is shared with the ImageNet model (`cliquenet_imagenet.py`), which
only changes the stem, the per-block widths and the options."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cliquejax import clique, layers, ops
from cliquejax.models.common import (
    ModelConfig,
    check_range,
    compute_dtype,
    kernel_ops,
    remat_policy,
)


class CliqueNet(nn.Module):
    num_classes: int
    channels: Sequence[int]  # k per block
    num_layers: Sequence[int]  # n per block
    variant: str = "II+II"
    x: int = 0
    attention: bool = False
    bottleneck: bool = False
    compression: bool = False
    dropout_rate: float = 0.2
    stem: str = "cifar"  # cifar: 3x3 conv 64 | imagenet: 7x7/2 conv 64, BN, ReLU, 3x3/2 max pool
    kernel_init: Any = layers.he_fan_in
    unroll: bool = True
    dtype: Any = None
    bn: ops.BNSpec = ops.TF_BN
    remat: str = "none"  # clique.REMAT_POLICIES: the blocks' own, and the units around them
    ops: ops.Ops = ops.REFERENCE  # the operations (`cliquejax.kernels`)

    def block_spec(self, b: int, in_channels: int) -> clique.BlockSpec:
        return clique.BlockSpec(
            in_channels=in_channels, channels=self.channels[b], num_layers=self.num_layers[b],
            variant=self.variant, x=self.x, bottleneck=self.bottleneck,
            dropout_rate=self.dropout_rate, bn=self.bn, unroll=self.unroll,
            dtype=self.dtype, remat=self.remat, ops=self.ops)

    def _stem(self, x, train):
        if self.stem == "cifar":
            return layers.Conv(64, 3, kernel_init=self.kernel_init, dtype=self.dtype,
                               ops=self.ops, name="stem")(x)
        x = layers.Conv(64, 7, 2, self.kernel_init, self.dtype, self.ops, name="stem")(x)
        x = layers.BatchNorm(self.bn, relu=True, ops=self.ops, name="stem_bn")(x, train)
        return self.ops.max_pool(x, 3, 2)

    @nn.compact
    def __call__(self, images, train: bool = False):
        unit = lambda cls: layers.checkpointed(cls, self.remat)  # remat inside the blocks: spec
        x = unit(type(self)._stem)(self, images.astype(self.dtype or jnp.float32), train)
        pooled = []
        for b in range(len(self.channels)):
            spec = self.block_spec(b, x.shape[-1])
            block, transit = layers.CliqueBlock(spec, self.kernel_init, name=f"block{b + 1}")(
                x, train)
            if self.compression:
                block = unit(layers.BNReLUConv)(
                    block.shape[-1] // 2, 1, self.dropout_rate, self.kernel_init, self.dtype,
                    self.bn, self.ops, name=f"compression{b + 1}")(block, train)
            pooled.append(unit(layers.PooledFeature)(self.bn, self.ops,
                                                     name=f"pool{b + 1}")(block, train))
            if b < len(self.channels) - 1:
                x = unit(layers.Transition)(self.dropout_rate, self.attention, self.kernel_init,
                                            self.dtype, self.bn, self.ops,
                                            name=f"transition{b + 1}")(transit, train)
        features = jnp.concatenate(pooled, axis=-1).astype(jnp.float32)
        return nn.Dense(self.num_classes, kernel_init=layers.xavier, name="classifier")(features)


@dataclasses.dataclass(frozen=True)
class CliqueNetConfig(ModelConfig):
    """The fields of config.model for this model (see `configs/cliquenet_cifar10.py`)."""

    k: int = 36
    T: int = 12
    variant: str = "II+II"
    x: int = 0
    attention: bool = False
    bottleneck: bool = False
    compression: bool = False
    dropout_rate: float = 0.2
    unroll: bool = True

    @property
    def layers_per_block(self) -> int:
        """n = T // 3, halved again with the bottleneck (CliqueNet's `if_b` option)."""
        n = self.T // 3
        return n // 2 if self.bottleneck else n

    def __post_init__(self):
        super().__post_init__()
        check_range("model.k", self.k, 1)
        n = self.layers_per_block
        if n < 1:
            need = 6 if self.bottleneck else 3
            raise ValueError(f"model.T={self.T} gives {n} layers per block; allowed: "
                             f"T >= {need} (three blocks of T // 3 layers"
                             f"{', halved by the bottleneck' if self.bottleneck else ''})")
        clique.check_wiring(self.variant, self.x, n, origin=f"model.T={self.T}")
        check_range("model.dropout_rate", self.dropout_rate, 0.0, 0.99)


FIELDS = CliqueNetConfig


def build(config, num_classes: int) -> CliqueNet:
    m = CliqueNetConfig.from_config(config.model)
    n = m.layers_per_block
    return CliqueNet(
        num_classes=num_classes, channels=(m.k,) * 3, num_layers=(n,) * 3, variant=m.variant,
        x=m.x, attention=m.attention, bottleneck=m.bottleneck, compression=m.compression,
        dropout_rate=m.dropout_rate, unroll=m.unroll, dtype=compute_dtype(config),
        bn=m.bn, remat=remat_policy(config), ops=kernel_ops(config))
