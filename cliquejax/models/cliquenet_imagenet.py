"""CliqueNet-S0..S3 for ImageNet, as the authors' PyTorch model builds them.

Four blocks with their own k and layer counts, a 7x7/2 stem with BN-ReLU and 3x3/2 max
pool, bottleneck layers always (1x1 clique kernels + shared 3x3), compression of every block
feature before the global pool, attentional transitions (default on), no dropout, fan-out
He init, variant II+II: the fixed choices are class constants, the body is CIFAR
CliqueNet's (`cliquenet.network`)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn

from cliquejax.layers import he_fan_out
from cliquejax.models.cliquenet import network
from cliquejax.models.common import Model, check_choice, check_lengths

SETTINGS = {  # name: (k per block, layers per block)
    "S0": ((36, 64, 100, 80), (5, 6, 6, 6)),
    "S1": ((36, 80, 120, 100), (5, 6, 6, 6)),
    "S2": ((36, 80, 150, 120), (5, 5, 6, 6)),
    "S3": ((40, 80, 160, 160), (6, 6, 6, 6)),
}


class CliqueNetImageNet(Model):
    """The fields are `config.model`'s (`configs/cliquenet_imagenet.py`): `channels` and
    `layers` replace the setting's per-block values when not empty."""

    setting: str = "S3"
    channels: Sequence[int] = ()
    layers: Sequence[int] = ()
    attention: bool = True
    unroll: bool = True

    variant, x, bottleneck, compression, dropout_rate = "II+II", 0, True, True, 0.0
    stem = "imagenet"
    kernel_init = staticmethod(he_fan_out)

    @property
    def blocks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(k per block, layers per block)."""
        channels, num_layers = SETTINGS[self.setting]
        return tuple(self.channels) or channels, tuple(self.layers) or num_layers

    def __post_init__(self):
        check_choice("model.setting", self.setting, sorted(SETTINGS))
        channels, num_layers = self.blocks
        check_lengths({"model.channels": channels, "model.layers": num_layers})
        super().__post_init__()

    @nn.compact
    def __call__(self, images, train: bool = False):
        return network(self, images, train)
