"""Platform set-up that must happen before JAX initialises its backends.

Import this module (and call `configure_xla()`) before the first JAX computation. On CPU,
XLA routes convolutions to YNNPACK by default, which is slow for CliqueNet's shapes; the
flag below sends them back to XLA's own (Eigen) convolution, measured ~1.7x faster for a
full CliqueNet training step on this project's 2-core machine (see README, "Speed").
"""

from __future__ import annotations

import importlib.util
import os

CPU_XLA_FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    # XLA:CPU otherwise drops the barriers `jax.checkpoint` places and merges the recomputation
    # back into the forward pass, so `config.train.remat` would save no memory (measured:
    # CliqueNet k=36 T=12 batch 64, remat=layer, XLA temp memory 1687 -> 471 MB with it).
    # Without remat there are no barriers and the flag changes nothing.
    "--xla_disable_hlo_passes=cse_barrier_expander",
)
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "jax_rocm60_plugin")


def running_on_cpu_only() -> bool:
    """True when JAX will pick the CPU backend: no accelerator plugin, or JAX_PLATFORMS=cpu."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def configure_xla(extra_flags: tuple[str, ...] = ()) -> str:
    """Adds the CPU flags (and `extra_flags`) to XLA_FLAGS unless already present."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    wanted = (CPU_XLA_FLAGS if running_on_cpu_only() else ()) + tuple(extra_flags)
    for flag in wanted:
        name = flag.split("=")[0]
        if not any(f.split("=")[0] == name for f in flags):
            flags.append(flag)
    os.environ["XLA_FLAGS"] = " ".join(flags)
    return os.environ["XLA_FLAGS"]
