"""Platform set-up that must happen before JAX initialises its backends.

Import this module (and call `configure_xla()`) before the first JAX computation. On CPU,
XLA routes convolutions to YNNPACK by default, which is slow for CliqueNet's shapes; the
flags below send them back to XLA's own (Eigen) convolution, measured ~1.7x faster for a
full CliqueNet training step on this project's 2-core machine, and lower the peak memory
(see README, "Speed on CPU"). `use_compilation_cache` keeps compiled programs on disk for
the next process. `restart_with_huge_pages` re-executes a main script so that malloc hands
out transparent huge pages (fewer page faults per training step).
"""

from __future__ import annotations

import importlib.util
import os
import platform as host
import sys

CPU_XLA_FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    # XLA:CPU otherwise drops the barriers `jax.checkpoint` places and merges the recomputation
    # back into the forward pass, so `config.train.remat` would save no memory (measured:
    # CliqueNet k=36 T=12 batch 64, remat=layer, XLA temp memory 1687 -> 471 MB with it).
    # Without remat there are no barriers and the flag changes nothing.
    "--xla_disable_hlo_passes=cse_barrier_expander",
    # XLA:CPU's newer fusion emitters hold more temporaries: the older loop emitter gives
    # the same step time with a lower peak (measured, peak RSS of a training step:
    # CliqueNet k=36 T=12 b64 2380 -> 2000 MB, CliqueNet-S0 224 b8 3607 -> 2509 MB).
    "--xla_cpu_use_fusion_emitters=false",
    # The fused elementwise kernels gain nothing from LLVM's highest optimisation level (the
    # convolutions are library calls); level 1 without the expensive passes compiles the
    # CliqueNet k=36 T=12 step in 9.8 s instead of 13.2 s at the same speed (S0: 32 -> 28 s).
    "--xla_backend_optimization_level=1",
    "--xla_llvm_disable_expensive_passes=true",
)
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
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


def default_compilation_cache() -> str:
    """$JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/cliquejax/jax (~/.cache)."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache_home, "cliquejax", "jax")


def use_compilation_cache(directory: str) -> None:
    """Keeps every compiled program that took over a second (or
    $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS) in `directory`, so the next
    process with the same program, flags and JAX version loads it instead of compiling:
    CliqueNet k=36 T=12's training step, 13.1 s to trace and compile on a 2-core CPU, is
    traced and loaded in 2.8 s (README, "Speed on CPU"). '' turns the cache off; a directory
    that cannot be written only costs a warning."""
    import jax

    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def huge_pages_available() -> bool:
    """True on Linux with glibc >= 2.35 (malloc's hugetlb tunable) whose kernel gives
    transparent huge pages on request."""
    libc, version = host.libc_ver()
    if not sys.platform.startswith("linux") or libc != "glibc":
        return False
    if tuple(int(part) for part in version.split(".")[:2]) < (2, 35):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as modes:
            return "[never]" not in modes.read()
    except OSError:
        return False


def huge_pages_wanted() -> bool:
    """True on a CPU-only host where huge pages are available, unless GLIBC_TUNABLES already
    sets them or the user opted out with CLIQUEJAX_HUGE_PAGES=0."""
    if os.environ.get("CLIQUEJAX_HUGE_PAGES", "1") == "0":
        return False
    if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return huge_pages_available() and running_on_cpu_only()


def restart_with_huge_pages() -> None:
    """Re-executes this process (same interpreter, same arguments) with glibc's malloc asking
    the kernel for transparent huge pages. XLA:CPU's convolutions take ~34 MB packing buffers
    from fresh mmaps on every call, so each training step faulted in ~90k new 4 KiB pages:
    CliqueNet-S0 224 b8 spent ~7% of its step in the kernel, and ran 1490 -> 1373 ms per step
    with the tunable (README, "Speed on CPU"). Call it first thing in a main script."""
    if huge_pages_wanted():
        tunables = [os.environ.get("GLIBC_TUNABLES", ""), HUGE_PAGES_TUNABLE]
        os.environ["GLIBC_TUNABLES"] = ":".join(t for t in tunables if t)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
