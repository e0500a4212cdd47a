"""XLA:CPU set-up that must happen before JAX initialises its backends: the XLA flags of the
CPU backend, and the restart of the main script with transparent huge pages for malloc.

Imports nothing but the standard library: the launcher reads it before JAX starts, and may
re-execute the process. `cliquejax.platform` applies both on a host where JAX runs on the
CPU (benchmarks/README.md says what each was measured to change)."""

from __future__ import annotations

import os
import platform as host
import sys

CPU_XLA_FLAGS = (
    # XLA:CPU routes convolutions to YNNPACK by default, which is slow for CliqueNet's
    # shapes; this sends them back to XLA's own (Eigen) convolution, which ran a full
    # CliqueNet training step faster with a lower peak memory.
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    # XLA:CPU otherwise drops the barriers `jax.checkpoint` places and merges the recomputation
    # back into the forward pass, so `config.train.remat` would save no memory.
    # Without remat there are no barriers and the flag changes nothing.
    "--xla_disable_hlo_passes=cse_barrier_expander",
    # XLA:CPU's newer fusion emitters hold more temporaries: the older loop emitter gives
    # the same step time with a lower peak memory.
    "--xla_cpu_use_fusion_emitters=false",
    # The fused elementwise kernels gain nothing from LLVM's highest optimisation level (the
    # convolutions are library calls); level 1 without the expensive passes compiles the
    # training steps faster at the same speed.
    "--xla_backend_optimization_level=1",
    "--xla_llvm_disable_expensive_passes=true",
)
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
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
