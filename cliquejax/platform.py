"""Process set-up that must happen before JAX initialises its backends.

Import this module (and call `configure_xla()`) before the first JAX computation.
`use_compilation_cache` keeps compiled programs on disk for the next process. On a host
where JAX runs on the CPU, `configure_xla` adds the XLA:CPU flags and
`restart_with_huge_pages` re-executes a main script with malloc's transparent huge pages,
both from `cliquejax/cpu/platform.py`; without that package (a fork for accelerators) they
do nothing. These tune the backend, whichever `config.train.kernels` the run then chooses
(the config is read after JAX's flags are fixed).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys

_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "jax_rocm60_plugin",
                       "jax_rocm7_plugin")
_CPU_PLATFORM = "cliquejax.cpu.platform"
# The distributions that give JAX a GPU or TPU backend (the names pip installs).
_PLUGIN_DISTRIBUTIONS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu", "libtpu-nightly",
                         "jax-rocm60-plugin", "jax-rocm7-plugin")


def running_on_cpu_only() -> bool:
    """True when JAX will pick the CPU backend: no accelerator plugin, or JAX_PLATFORMS=cpu."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def cpu_platform():
    """`cliquejax.cpu.platform` on a CPU-only host where that package exists, else None."""
    from cliquejax import kernels

    if not running_on_cpu_only() or not kernels.cpu_kernels_present():
        return None
    return importlib.import_module(_CPU_PLATFORM)


def configure_xla(extra_flags: tuple[str, ...] = ()) -> str:
    """Adds the XLA:CPU flags (on a CPU-only host) and `extra_flags` to XLA_FLAGS, each
    unless the user already set that flag."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    cpu = cpu_platform()
    wanted = (cpu.cpu_xla_flags() if cpu else ()) + tuple(extra_flags)
    for flag in wanted:
        name = flag.split("=")[0]
        if not any(f.split("=")[0] == name for f in flags):
            flags.append(flag)
    os.environ["XLA_FLAGS"] = " ".join(flags)
    return os.environ["XLA_FLAGS"]


def restart_with_huge_pages() -> None:
    """On a CPU-only host, `cliquejax.cpu.platform.restart_with_huge_pages()` (re-executes
    the process once with malloc's huge pages); elsewhere nothing. Call it first thing."""
    cpu = cpu_platform()
    if cpu is not None:
        cpu.restart_with_huge_pages()


def jax_environment_problem() -> str | None:
    """One line naming an environment variable that sets JAX up in a way this project cannot
    run with (64-bit arrays; a platform without devices here), else None. Initialises JAX's
    backends: call it after `jax.distributed.initialize`, before anything is written."""
    import jax

    if jax.config.jax_enable_x64:
        return (f"error: JAX_ENABLE_X64={os.environ.get('JAX_ENABLE_X64', '')} is set; allowed: "
                "unset it (cliquejax computes in float32 and bfloat16, as its checkpoints "
                "and configs are written)")
    try:
        jax.devices()
    except Exception as error:  # noqa: BLE001 - JAX raises RuntimeError or AssertionError
        platforms = os.environ.get("JAX_PLATFORMS", "")
        reason = " ".join(str(error).split())[:200] or "no backend of that name starts here"
        given = f"JAX_PLATFORMS={platforms}" if platforms else "JAX's default backend"
        return (f"error: {given} cannot be used on this machine ({reason}); allowed: "
                "JAX_PLATFORMS unset, cpu, or a platform whose devices and JAX plugin are here")
    return None


def init_compiler_options() -> dict | None:
    """Compiler options for a program that runs once (the initial state): those of
    `cliquejax/cpu/platform.py` when JAX runs on the CPU and that package exists, else None."""
    import jax

    cpu = cpu_platform()
    return dict(cpu.INIT_COMPILER_OPTIONS) if cpu and jax.default_backend() == "cpu" else None


def default_compilation_cache() -> str:
    """$JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/cliquejax/jax (~/.cache)."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache_home, "cliquejax", "jax")


def cpu_processes() -> bool:
    """Several processes on XLA:CPU (their collectives go through gloo)."""
    import jax

    return jax.process_count() > 1 and jax.default_backend() == "cpu"


def no_cache_across_cpu_processes() -> None:
    """Turns JAX's persistent compilation cache off in a run of several processes on XLA:CPU.

    JAX writes the cache from process 0 only and every process reads it, so a second run
    loads process 0's executable into process 1 too. On XLA:CPU with gloo (jaxlib 0.12.1)
    that executable's first all-reduce then waits forever in both processes: a run with a
    warm cache hangs in its first step (tests/test_distributed.py runs one twice). Call
    after `jax.distributed.initialize`, before the run compiles (`Trainer` does); the
    cache is reset so the decision is taken again."""
    import jax

    if cpu_processes():
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()


def use_compilation_cache(directory: str) -> None:
    """Keeps every compiled program that took over a second (or
    $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS) in `directory`, so that the next process
    with the same program, flags and JAX version loads it instead of compiling it again
    (benchmarks/README.md). '' turns the cache off; a directory that cannot be written
    only costs a warning."""
    import jax

    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def installed_plugins() -> dict[str, str]:
    """The accelerator plugins pip installed (distribution name -> version), read from the
    packages' metadata: a plugin present but not loaded is listed too."""
    found = {}
    for distribution in importlib.metadata.distributions():
        name = (distribution.metadata["Name"] or "").lower().replace("_", "-")
        if name in _PLUGIN_DISTRIBUTIONS:
            found[name] = distribution.version
    return dict(sorted(found.items()))


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def runtime() -> dict:
    """What this run computes on: backend, device kind and count, processes, and the jax,
    jaxlib and plugin versions (recorded in results.json)."""
    import jax

    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "devices": jax.device_count(), "processes": jax.process_count(),
            "jax_version": jax.__version__, "jaxlib_version": _version("jaxlib"),
            "plugins": installed_plugins()}


def runtime_line(info: dict) -> str:
    """The first line of a run: `runtime()` in words."""
    plugins = "".join(f", {name} {version}" for name, version in info["plugins"].items())
    return (f"running on {info['backend']}: {info['devices']} x {info['device_kind']}, "
            f"{info['processes']} process{'es' if info['processes'] > 1 else ''}; "
            f"jax {info['jax_version']}, jaxlib {info['jaxlib_version']}{plugins}")


def announce_runtime() -> None:
    """The first line of a run or an evaluation, once its checks have passed (an error
    stays one line): what runs (`runtime_line`), on process 0; then, where a GPU or TPU
    plugin is installed but JAX runs on the CPU (allowed: `launch --allow_cpu`), a warning."""
    import jax

    info = runtime()
    if jax.process_index() == 0:
        fallback = cpu_fallback(info)
        print(runtime_line(info) + (f"\nwarning: {fallback}; running on the CPU (--allow_cpu)"
                                    if fallback else ""), file=sys.stderr, flush=True)


def cpu_fallback(info: dict) -> str | None:
    """Where a GPU or TPU plugin is installed but JAX runs on the CPU without being asked to
    (JAX_PLATFORMS), why and the fix in one line; else None. JAX's own word for it is a log
    warning a user does not see among a run's lines."""
    asked = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if info["backend"] != "cpu" or not info["plugins"] or asked.split(",")[0] == "cpu":
        return None
    plugins = ", ".join(f"{name} {version}" for name, version in info["plugins"].items())
    extra = "tpu" if any(name.startswith("libtpu") for name in info["plugins"]) else \
        "cuda13" if "jax-cuda13-plugin" in info["plugins"] else \
        "cuda12" if "jax-cuda12-plugin" in info["plugins"] else "rocm"
    return (f"{plugins} installed, but JAX (jax {info['jax_version']}, jaxlib "
            f"{info['jaxlib_version']}) fell back to the CPU: no accelerator was found, or the "
            f"plugin does not match jax (fix: pip install \"jax[{extra}]=={info['jax_version']}\""
            f", and check nvidia-smi / the TPU runtime)")
