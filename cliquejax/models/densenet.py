"""DenseNet baseline of the CliqueNet paper's Table 3 (Huang et al. 2017, no bottleneck, no
compression): a 16-channel 3x3 stem, three dense blocks of T // 3 layers of
BN-ReLU-3x3 conv (growth k)-dropout, transitions BN-ReLU-1x1 conv-dropout-2x2 average pool,
head BN-ReLU-global average pool of the last block and a dense layer."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from cliquejax import layers, ops
from cliquejax.models.common import Model, check_range


class DenseNet(Model):
    """The fields are `config.model`'s (`configs/densenet_cifar10.py`). `remat`: none | layer
    (each conv unit) | block (each dense block; transitions)."""

    k: int = 12  # growth rate
    T: int = 36  # layers, T // 3 per block
    dropout_rate: float = 0.2

    def __post_init__(self):
        check_range("model.k", self.k, 1)
        if self.T // 3 < 1:
            raise ValueError(f"model.T={self.T} gives 0 layers per block; allowed: T >= 3")
        check_range("model.dropout_rate", self.dropout_rate, 0.0, 0.99)
        super().__post_init__()

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = layers.Conv(16, 3, dtype=self.dtype, ops=self.ops, name="stem")(
            images.astype(self.dtype or jnp.float32))
        unit = layers.checkpointed(layers.BNReLUConv, self.remat)
        for b in range(3):
            block = functools.partial(_dense_block, index=b + 1)
            x = layers.checkpointed(block, "block" if self.remat == "block" else "none")(
                self, x, train)
            if b < 2:
                x = unit(x.shape[-1], 1, self.dropout_rate, dtype=self.dtype, bn=self.bn,
                         ops=self.ops, name=f"transition{b + 1}")(x, train)
                x = ops.avg_pool(x, 2)
        pooled = layers.PooledFeature(self.bn, self.ops, name="pool")(x, train)
        pooled = pooled.astype(jnp.float32)
        return nn.Dense(self.num_classes, kernel_init=layers.xavier, name="classifier")(pooled)


def _dense_block(model: DenseNet, x, train: bool, *, index: int):
    """Dense block `index`: each layer's output is concatenated to its input."""
    per_layer = "layer" if model.remat.startswith("layer") else "none"
    unit = layers.checkpointed(layers.BNReLUConv, per_layer)
    for i in range(model.T // 3):
        new = unit(model.k, 3, model.dropout_rate, dtype=model.dtype, bn=model.bn,
                   ops=model.ops, name=f"block{index}_layer{i + 1}")(x, train)
        x = jnp.concatenate([x, new], axis=-1)
    return x
