"""Accelerator descriptions: one JSON file per target, with its peak figures and their source.

Each file names the `jax.Device.device_kind` strings it describes, the dense peak FLOP/s by
compute dtype, the memory bandwidth (bytes/s) and where the figures come from. MFU (model
FLOPs utilisation) is the step's counted FLOPs per second over `peak_flops` of the dtype the
step computes in.
"""

from __future__ import annotations

import functools
import json
from importlib import resources


@functools.cache
def load() -> dict[str, dict]:
    """Target name (the file's stem: h100, h200, a100, tpu_v5e) -> its description."""
    folder = resources.files(__name__)
    return {entry.name.removesuffix(".json"): json.loads(entry.read_text())
            for entry in folder.iterdir() if entry.name.endswith(".json")}


def for_device_kind(device_kind: str) -> dict | None:
    """The description whose `device_kinds` include `device_kind` (as JAX reports it), or
    None for a device we have no figures for (a CPU, an unlisted card)."""
    return next((target for target in load().values()
                 if device_kind in target["device_kinds"]), None)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of `device_kind` computing in `dtype` ("bfloat16", "float32"), or
    None where unknown."""
    target = for_device_kind(device_kind)
    return None if target is None else target["peak_flops"].get(dtype)
