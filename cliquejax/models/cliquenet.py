"""CliqueNet (Yang et al., CVPR 2018), CIFAR/SVHN model, as the
authors' TensorFlow code builds it.

The network body (`network`) is shared with the ImageNet model (`cliquenet_imagenet.py`),
which only changes the stem, the per-block widths and the options."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cliquejax import clique, layers
from cliquejax.models.common import Model, check_range


class CliqueNet(Model):
    """CliqueNet for CIFAR/SVHN; the fields are `config.model`'s (`configs/cliquenet_cifar10.py`):
    three blocks of k channels and T // 3 layers (halved with the bottleneck)."""

    k: int = 36
    T: int = 12
    variant: str = "II+II"  # clique.VARIANTS
    x: int = 0  # variant X: layers per block that get the Stage-II update
    attention: bool = False  # attentional transitions (--if_a)
    bottleneck: bool = False  # 1x1 clique kernels + a shared 3x3 (--if_b)
    compression: bool = False  # halve every block feature before the pool (--if_c)
    dropout_rate: float = 0.2
    unroll: bool = True  # Python-unrolled layers, or the jax.lax loop form

    stem = "cifar"  # cifar: 3x3 conv 64 | imagenet: 7x7/2 conv 64, BN, ReLU, 3x3/2 max pool
    kernel_init = staticmethod(layers.he_fan_in)

    @property
    def blocks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(k per block, layers per block): n = T // 3, halved again with the bottleneck
        (CliqueNet's `if_b` option)."""
        n = self.T // 3
        return (self.k,) * 3, (n // 2 if self.bottleneck else n,) * 3

    def __post_init__(self):
        check_range("model.k", self.k, 1)
        n = self.blocks[1][0]
        if n < 1:
            need = 6 if self.bottleneck else 3
            raise ValueError(f"model.T={self.T} gives {n} layers per block; allowed: "
                             f"T >= {need} (three blocks of T // 3 layers"
                             f"{', halved by the bottleneck' if self.bottleneck else ''})")
        clique.check_wiring(self.variant, self.x, n, origin=f"model.T={self.T}")
        check_range("model.dropout_rate", self.dropout_rate, 0.0, 0.99)
        super().__post_init__()

    @nn.compact
    def __call__(self, images, train: bool = False):
        return network(self, images, train)


def _stem(model, x, train):
    if model.stem == "cifar":
        return layers.Conv(64, 3, kernel_init=model.kernel_init, dtype=model.dtype,
                           ops=model.ops, name="stem")(x)
    x = layers.Conv(64, 7, 2, model.kernel_init, model.dtype, model.ops, name="stem")(x)
    x = layers.BatchNorm(model.bn, relu=True, ops=model.ops, name="stem_bn")(x, train)
    return model.ops.max_pool(x, 3, 2)


def network(model, images, train: bool):
    """The CliqueNet body, inside `model`'s compact `__call__`: the stem, then per block a
    clique block, [compression], its pooled feature and a transition; the classifier reads
    the pooled features of every block. `model` has the fields and constants of `CliqueNet`."""
    unit = lambda cls: layers.checkpointed(cls, model.remat)  # remat inside blocks: spec
    x = unit(_stem)(model, images.astype(model.dtype or jnp.float32), train)
    pooled = []
    channels, num_layers = model.blocks
    for b, (k, n) in enumerate(zip(channels, num_layers, strict=True)):
        spec = clique.BlockSpec(
            in_channels=x.shape[-1], channels=k, num_layers=n, variant=model.variant,
            x=model.x, bottleneck=model.bottleneck, dropout_rate=model.dropout_rate,
            bn=model.bn, unroll=model.unroll, dtype=model.dtype, remat=model.remat,
            ops=model.ops)
        block, transit = layers.CliqueBlock(spec, model.kernel_init, name=f"block{b + 1}")(
            x, train)
        if model.compression:
            block = unit(layers.BNReLUConv)(
                block.shape[-1] // 2, 1, model.dropout_rate, model.kernel_init, model.dtype,
                model.bn, model.ops, name=f"compression{b + 1}")(block, train)
        pooled.append(unit(layers.PooledFeature)(model.bn, model.ops,
                                                 name=f"pool{b + 1}")(block, train))
        if b < len(channels) - 1:
            x = unit(layers.Transition)(model.dropout_rate, model.attention, model.kernel_init,
                                        model.dtype, model.bn, model.ops,
                                        name=f"transition{b + 1}")(transit, train)
    features = jnp.concatenate(pooled, axis=-1).astype(jnp.float32)
    return nn.Dense(model.num_classes, kernel_init=layers.xavier, name="classifier")(features)
