"""XLA:CPU set-up that must happen before JAX initialises its backends: the XLA flags of the
CPU backend, and the restart of the main script with transparent huge pages for malloc.

Imports nothing but the standard library: the launcher reads it before JAX starts, and may
re-execute the process. `cliquejax.platform` applies both on a host where JAX runs on the
CPU (benchmarks/README.md says what each was measured to change)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform as host
import re
import signal
import subprocess
import sys

# Each flag with the jaxlib release that dropped it (None: every release we know has it). An
# unknown flag in XLA_FLAGS is fatal at start-up, so a flag is only ever passed to a jaxlib
# that takes it.
_FLAGS_AND_LAST_RELEASE = (
    # XLA:CPU routes convolutions to YNNPACK by default, which is slow for CliqueNet's
    # shapes; this sends them back to XLA's own (Eigen) convolution, which ran a full
    # CliqueNet training step faster with a lower peak memory.
    ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution", None),
    # XLA:CPU otherwise drops the barriers `jax.checkpoint` places and merges the recomputation
    # back into the forward pass, so `config.train.remat` would save no memory.
    # Without remat there are no barriers and the flag changes nothing.
    ("--xla_disable_hlo_passes=cse_barrier_expander", None),
    # XLA:CPU's newer fusion emitters held more temporaries up to jaxlib 0.10: the older loop
    # emitter gave the same step time with a lower peak memory. jaxlib 0.11 removed the older
    # emitter and the flag with it.
    ("--xla_cpu_use_fusion_emitters=false", (0, 11)),
    # The fused elementwise kernels gain nothing from LLVM's highest optimisation level (the
    # convolutions are library calls); level 1 without the expensive passes compiles the
    # training steps faster at the same speed.
    ("--xla_backend_optimization_level=1", None),
    ("--xla_llvm_disable_expensive_passes=true", None),
)
# The newest jaxlib each flag above was checked on; a newer one is probed once (`cpu_xla_flags`).
TESTED_JAXLIB = (0, 12, 1)


def jaxlib_version() -> tuple[int, ...] | None:
    """The installed jaxlib's version as integers (read from its metadata, JAX not imported)."""
    try:
        text = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def flags_for(version: tuple[int, ...] | None) -> tuple[str, ...]:
    """The flags a jaxlib of `version` takes, by the table above."""
    return tuple(
        flag
        for flag, dropped in _FLAGS_AND_LAST_RELEASE
        if dropped is None or (version is not None and version < dropped)
    )


def _accepted(flags: tuple[str, ...]) -> bool:
    """Whether a fresh process on the CPU starts XLA with `flags` (an unknown flag aborts)."""
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    env.pop("GLIBC_TUNABLES", None)
    probe = "import jax; jax.numpy.zeros(1).block_until_ready()"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True)
    return done.returncode == 0


def cpu_xla_flags(cache_dir: str | None = None) -> tuple[str, ...]:
    """The XLA:CPU flags for the installed jaxlib. Up to `TESTED_JAXLIB` the table decides; a
    newer jaxlib gets only the flags a probe process starts with (each tried alone when the
    set fails), remembered per version in `cache_dir` so that the probe runs once."""
    version = jaxlib_version()
    flags = flags_for(version)
    if version is None or version <= TESTED_JAXLIB:
        return flags
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    cache_dir = cache_dir or os.path.join(cache_home, "cliquejax")
    record = os.path.join(cache_dir, "xla_cpu_flags-" + ".".join(map(str, version)) + ".json")
    try:
        with open(record) as f:
            return tuple(json.load(f))
    except (OSError, ValueError):
        pass
    if not _accepted(flags):
        flags = tuple(flag for flag in flags if _accepted((flag,)))
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with open(record, "w") as f:
            json.dump(list(flags), f)
    except OSError:
        pass
    return flags


# The initial state is computed once: LLVM's optimisations of XLA:CPU are not worth their
# compile time there (the values differ by at most one float32 ulp, from the truncated-normal
# math; tests/test_initial_state.py).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


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
    """True where huge pages are available, unless GLIBC_TUNABLES already sets them or the
    user opted out with CLIQUEJAX_HUGE_PAGES=0."""
    if os.environ.get("CLIQUEJAX_HUGE_PAGES", "1") == "0":
        return False
    if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return huge_pages_available()


def restart_with_huge_pages() -> None:
    """Re-executes this process (same interpreter, same arguments) with glibc's malloc asking
    the kernel for transparent huge pages, when `huge_pages_wanted()`. XLA:CPU's convolutions
    take large packing buffers from fresh mmaps on every call, so each training step faulted
    in new 4 KiB pages by the tens of thousands and spent a visible part of its time in the
    kernel. Call it first thing in a main script."""
    if huge_pages_wanted():
        tunables = [os.environ.get("GLIBC_TUNABLES", ""), HUGE_PAGES_TUNABLE]
        os.environ["GLIBC_TUNABLES"] = ":".join(t for t in tunables if t)
        sys.stdout.flush()
        sys.stderr.flush()
        # A Ctrl-C during the re-execution (Python's start-up, the imports) stays pending,
        # blocked, until the new process's handler is installed (`cliquejax.launch.run`).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
