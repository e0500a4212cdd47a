"""DenseNet baseline of the CliqueNet paper's Table 3 (Huang et al. 2017, no bottleneck, no
compression): a 16-channel 3x3 stem, three dense blocks of T // 3 layers of
BN-ReLU-3x3 conv (growth k)-dropout, transitions BN-ReLU-1x1 conv-dropout-2x2 average pool,
head BN-ReLU-global average pool of the last block and a dense layer."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cliquejax import layers, ops
from cliquejax.models.common import check_range, compute_dtype


class DenseNet(nn.Module):
    num_classes: int
    growth_rate: int
    layers_per_block: int
    dropout_rate: float = 0.2
    dtype: Any = None

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = layers.Conv(16, 3, dtype=self.dtype, name="stem")(
            images.astype(self.dtype or jnp.float32))
        for b in range(3):
            for i in range(self.layers_per_block):
                new = layers.BNReLUConv(self.growth_rate, 3, self.dropout_rate, dtype=self.dtype,
                                        name=f"block{b + 1}_layer{i + 1}")(x, train)
                x = jnp.concatenate([x, new], axis=-1)
            if b < 2:
                x = layers.BNReLUConv(x.shape[-1], 1, self.dropout_rate, dtype=self.dtype,
                                      name=f"transition{b + 1}")(x, train)
                x = ops.avg_pool(x, 2)
        pooled = layers.PooledFeature(name="pool")(x, train).astype(jnp.float32)
        return nn.Dense(self.num_classes, kernel_init=layers.xavier, name="classifier")(pooled)


def build(config, num_classes: int) -> DenseNet:
    m = config.model
    check_range("model.k", m.k, 1)
    if m.T // 3 < 1:
        raise ValueError(f"model.T={m.T} gives 0 layers per block; allowed: T >= 3")
    check_range("model.dropout_rate", m.dropout_rate, 0.0, 0.99)
    return DenseNet(num_classes, m.k, m.T // 3, m.dropout_rate, compute_dtype(config))
