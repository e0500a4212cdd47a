"""CliqueNet-S0..S3 for ImageNet, as the authors' PyTorch model builds them.

Four blocks with their own k and layer counts, a 7x7/2 stem with BN-ReLU and 3x3/2 max
pool, bottleneck layers always (1x1 clique kernels + shared 3x3), compression of every block
feature before the global pool, attentional transitions (default on), no dropout, fan-out
He init, variant II+II."""

from __future__ import annotations

import dataclasses

from cliquejax import layers
from cliquejax.models.cliquenet import CliqueNet
from cliquejax.models.common import (
    ModelConfig,
    check_choice,
    check_lengths,
    compute_dtype,
    kernel_ops,
    remat_policy,
)

SETTINGS = {  # name: (k per block, layers per block)
    "S0": ((36, 64, 100, 80), (5, 6, 6, 6)),
    "S1": ((36, 80, 120, 100), (5, 6, 6, 6)),
    "S2": ((36, 80, 150, 120), (5, 5, 6, 6)),
    "S3": ((40, 80, 160, 160), (6, 6, 6, 6)),
}


@dataclasses.dataclass(frozen=True)
class CliqueNetImageNetConfig(ModelConfig):
    """The fields of config.model for this model (see `configs/cliquenet_imagenet.py`):
    `channels` and `layers` replace the setting's per-block values when not empty."""

    setting: str = "S3"
    channels: tuple[int, ...] = ()
    layers: tuple[int, ...] = ()
    attention: bool = True
    unroll: bool = True

    @property
    def blocks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(k per block, layers per block)."""
        channels, num_layers = SETTINGS[self.setting]
        return tuple(self.channels) or channels, tuple(self.layers) or num_layers

    def __post_init__(self):
        super().__post_init__()
        check_choice("model.setting", self.setting, sorted(SETTINGS))
        channels, num_layers = self.blocks
        check_lengths({"model.channels": channels, "model.layers": num_layers})


FIELDS = CliqueNetImageNetConfig


def build(config, num_classes: int) -> CliqueNet:
    m = CliqueNetImageNetConfig.from_config(config.model)
    channels, num_layers = m.blocks
    return CliqueNet(
        num_classes=num_classes, channels=channels, num_layers=num_layers, variant="II+II",
        attention=m.attention, bottleneck=True, compression=True, dropout_rate=0.0,
        stem="imagenet", kernel_init=layers.he_fan_out, unroll=m.unroll,
        dtype=compute_dtype(config), bn=m.bn, remat=remat_policy(config),
        ops=kernel_ops(config))
