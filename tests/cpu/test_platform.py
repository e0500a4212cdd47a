"""platform.configure_xla: the XLA:CPU flags (`cliquejax.cpu.platform`) are added on CPU
only, and a flag the user set keeps the user's value; restart_with_huge_pages re-executes
with malloc's huge pages on, on a CPU host only."""

import os
import subprocess
import sys

import pytest

from cliquejax import platform
from tests.conftest import ROOT

cpu_platform = pytest.importorskip("cliquejax.cpu.platform")


def flag_names(flags: str) -> set[str]:
    return {flag.split("=")[0] for flag in flags.split()}


def test_cpu_flags_are_added_on_cpu(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    flags = platform.configure_xla()
    wanted = flag_names(" ".join(cpu_platform.cpu_xla_flags())) | {"--xla_dump_to"}
    assert flag_names(flags) == wanted
    assert "--xla_disable_hlo_passes=cse_barrier_expander" in flags.split()


def test_each_jaxlib_gets_only_the_flags_it_takes():
    old, new = cpu_platform.flags_for((0, 10, 2)), cpu_platform.flags_for((0, 11, 0))
    assert "--xla_cpu_use_fusion_emitters=false" in old  # removed from XLA in jaxlib 0.11
    assert "--xla_cpu_use_fusion_emitters=false" not in new
    assert set(new) < set(old)


@pytest.mark.slow
def test_the_installed_jaxlib_starts_with_its_flags():
    # An unknown flag in XLA_FLAGS aborts XLA at start-up: the flags chosen for this jaxlib
    # must start a real process (the probe that a newer, untested jaxlib gets).
    assert cpu_platform._accepted(cpu_platform.cpu_xla_flags())
    assert not cpu_platform._accepted(("--xla_no_such_flag_in_any_release=1",))


def test_an_untested_jaxlib_keeps_only_the_flags_a_process_starts_with(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_platform, "jaxlib_version", lambda: (99, 0, 0))
    monkeypatch.setattr(
        cpu_platform,
        "_FLAGS_AND_LAST_RELEASE",
        (("--xla_backend_optimization_level=1", None),
         ("--xla_no_such_flag_in_any_release=1", None)),
    )
    flags = cpu_platform.cpu_xla_flags(str(tmp_path))
    assert flags == ("--xla_backend_optimization_level=1",)
    record = tmp_path / "xla_cpu_flags-99.0.0.json"
    assert record.exists()  # probed once: the next process reads the answer
    monkeypatch.setattr(cpu_platform, "_accepted", lambda flags: pytest.fail("probed twice"))
    assert cpu_platform.cpu_xla_flags(str(tmp_path)) == flags


def test_the_users_value_wins(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
    flags = platform.configure_xla().split()
    assert "--xla_backend_optimization_level=3" in flags
    assert "--xla_backend_optimization_level=1" not in flags


def test_init_compiler_options_on_cpu():
    assert platform.init_compiler_options() == cpu_platform.INIT_COMPILER_OPTIONS


def test_huge_pages_are_not_asked_for_twice_or_against_the_user(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("CLIQUEJAX_HUGE_PAGES", "0")
    assert not cpu_platform.huge_pages_wanted()
    monkeypatch.delenv("CLIQUEJAX_HUGE_PAGES")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    assert not cpu_platform.huge_pages_wanted()
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert platform.cpu_platform() is cpu_platform
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert platform.cpu_platform() is None  # neither flags nor the restart on an accelerator


RESTARTED_SCRIPT = """
import ctypes, os, sys
sys.path.insert(0, {root!r})
from cliquejax import platform
from tests.conftest import ROOT
from cliquejax.cpu import platform as cpu_platform
print("run", os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
platform.restart_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
buffer = libc.malloc(64 << 20)  # one fresh mmap, as XLA's large buffers (numpy asks by itself)
ctypes.memset(buffer, 1, 64 << 20)
with open("/proc/self/smaps_rollup") as rollup:
    kib = [int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:")][0]
print("huge_kib", kib)
"""


def run_restarting_script(tmp_path, **env) -> list[str]:
    script = tmp_path / "restarting.py"
    script.write_text(RESTARTED_SCRIPT.format(root=str(ROOT)))
    environment = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    environment.update(JAX_PLATFORMS="cpu", **env)
    done = subprocess.run([sys.executable, str(script), "a", "--b=1"], env=environment,
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.splitlines()


@pytest.mark.slow
@pytest.mark.skipif(not cpu_platform.huge_pages_available(),
                    reason="no glibc >= 2.35 with transparent huge pages on this host")
def test_restart_keeps_the_arguments_and_gives_malloc_huge_pages(tmp_path):
    lines = run_restarting_script(tmp_path)
    assert lines[:2] == ["run None ['a', '--b=1']",
                         f"run {cpu_platform.HUGE_PAGES_TUNABLE} ['a', '--b=1']"]
    huge_kib = int(lines[2].split()[1])
    assert huge_kib >= 32 << 10  # at least half of the 64 MiB buffer in 2 MiB pages
    opted_out = run_restarting_script(tmp_path, CLIQUEJAX_HUGE_PAGES="0")
    assert opted_out[0] == "run None ['a', '--b=1']" and len(opted_out) == 2
    assert int(opted_out[1].split()[1]) < 32 << 10
