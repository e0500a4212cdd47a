"""Accelerator descriptions: one JSON file per target, with its peak figures and their source.

Each file names the `jax.Device.device_kind` strings it describes, the dense peak FLOP/s by
compute dtype, the memory bandwidth (bytes/s) and where the figures come from. MFU (model
FLOPs utilisation) is the step's counted FLOPs per second over `peak_flops` of the dtype the
step computes in.

The GPU files also describe the device to XLA:GPU (`xla_gpu_target_config`, the fields of
XLA's GpuTargetConfigProto, `gpu_target_config` gives its text format) so that
`cliquejax.lower --compile` compiles for a simulated one, and carry the roofline's fixed
costs (`kernel_seconds` per kernel, `collective_seconds` per collective) and the
interconnect's bandwidth each way (`interconnect_bandwidth`, bytes/s).
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


def _text_proto(fields: dict, indent: str = "") -> list[str]:
    lines = []
    for key, value in fields.items():
        if isinstance(value, dict):
            lines += [f"{indent}{key} {{", *_text_proto(value, indent + "  "), f"{indent}}}"]
        elif isinstance(value, str):
            lines.append(f"{indent}{key}: {json.dumps(value)}")
        else:
            lines.append(f"{indent}{key}: {value}")
    return lines


def gpu_target_config(name: str) -> str:
    """Target `name`'s XLA GpuTargetConfig in protobuf text format (what
    `jax.experimental.topologies.get_topology_desc(..., target_config=...)` reads)."""
    target = load().get(name)
    if target is None or "xla_gpu_target_config" not in target:
        raise ValueError(f"no XLA:GPU description for target {name!r}; allowed: "
                         f"{', '.join(gpu_names())}")
    return "\n".join(_text_proto(target["xla_gpu_target_config"])) + "\n"


def gpu_names() -> list[str]:
    """The targets XLA:GPU can compile for (those with an `xla_gpu_target_config`)."""
    return sorted(name for name, target in load().items() if "xla_gpu_target_config" in target)
