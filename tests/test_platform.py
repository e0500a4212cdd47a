"""cliquejax.platform without the CPU package's part (tests/cpu/test_platform.py): no XLA:CPU
set-up on an accelerator or without `cliquejax/cpu/`, and where the compilation cache lives."""

import importlib.util
import os
import subprocess
import sys

import pytest

from cliquejax import platform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_cpu_flags_on_an_accelerator(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    monkeypatch.setenv("XLA_FLAGS", "")
    assert platform.configure_xla() == ""


def test_default_compilation_cache(monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert platform.default_compilation_cache() == "/somewhere/cliquejax/jax"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/mine")
    assert platform.default_compilation_cache() == "/mine"


def test_cpu_set_up_only_with_the_cpu_package(monkeypatch):
    """A CPU host gets XLA:CPU flags and the initial state's compiler options only where
    `cliquejax/cpu/` exists (a copy without it runs this file: tests/test_kernels.py)."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "")
    present = importlib.util.find_spec("cliquejax.cpu") is not None
    assert (platform.configure_xla() != "") == present
    assert (platform.init_compiler_options() is not None) == present


def test_the_environment_of_a_job_of_several_processes_is_recognised(monkeypatch):
    """launch.py starts jax.distributed by itself where these show several processes
    (tests/test_distributed.py runs the srun and Open MPI cases)."""
    from cliquejax import launch

    for name, _ in launch.CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert launch.cluster_in_environment() is None
    for name, alone, several in (("SLURM_STEP_NUM_TASKS", "1", "4"),
                                 ("OMPI_COMM_WORLD_SIZE", "1", "2"),
                                 ("TPU_WORKER_HOSTNAMES", "t1v-0", "t1v-0,t1v-1"),
                                 ("JAX_COORDINATOR_ADDRESS", "", "10.0.0.1:1234")):
        monkeypatch.setenv(name, alone)
        assert launch.cluster_in_environment() is None, name
        monkeypatch.setenv(name, several)
        assert launch.cluster_in_environment() == f"{name}={several}"
        monkeypatch.delenv(name)


def fake_plugin(directory, name="jax-cuda13-plugin", version="0.12.1"):
    """What pip leaves of a plugin that JAX cannot load: its metadata on sys.path, no code."""
    info = directory / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return directory


def test_the_runtime_is_named_and_a_plugin_on_the_cpu_is_a_fallback(tmp_path, monkeypatch):
    import jax

    info = platform.runtime()
    assert info["backend"] == jax.default_backend() == "cpu" and info["plugins"] == {}
    assert platform.cpu_fallback(info) is None  # no plugin: the CPU is what was asked for
    line = platform.runtime_line(info)
    assert line.startswith("running on cpu: 1 x cpu, 1 process; jax ") and "\n" not in line
    monkeypatch.syspath_prepend(str(fake_plugin(tmp_path)))
    info = platform.runtime()
    assert info["plugins"] == {"jax-cuda13-plugin": "0.12.1"}
    assert "jax-cuda13-plugin 0.12.1" in platform.runtime_line(info)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    message = platform.cpu_fallback(info)
    assert "fell back to the CPU" in message and "\n" not in message
    assert f'pip install "jax[cuda13]=={jax.__version__}"' in message
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the CPU asked for: no fallback
    assert platform.cpu_fallback(info) is None


@pytest.mark.slow
def test_launch_refuses_to_fall_back_to_the_cpu_with_a_plugin_installed(tmp_path):
    """A jax-cuda plugin pip installed but JAX on the CPU: one line refuses with the fix and
    nothing is written; with --allow_cpu the run's first line names the CPU and the plugin,
    the second warns."""
    env = {key: value for key, value in os.environ.items() if key != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = os.pathsep.join([str(fake_plugin(tmp_path / "site")), ROOT])
    workdir = tmp_path / "run"
    command = [sys.executable, "launch.py", "--config=configs/mbclique_digits.py",
               f"--workdir={workdir}", "--config.model.widths=4,4,8",
               "--config.model.layers=2,2,2", "--config.train.epochs=1",
               "--config.train.max_steps=1"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and not workdir.exists(), done.stderr
    assert len(lines) == 1 and "--allow_cpu" in lines[0], done.stderr
    assert lines[0].startswith("error: jax-cuda13-plugin 0.12.1 installed, but JAX")
    done = subprocess.run(command + ["--allow_cpu"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 0, done.stderr[-3000:]
    # (the bundled digits may be built first, with TFDS's progress lines)
    first = next(i for i, line in enumerate(lines) if line.startswith("running on "))
    assert lines[first].startswith("running on cpu: 1 x cpu, 1 process; jax ")
    assert "jax-cuda13-plugin 0.12.1" in lines[first]
    assert lines[first + 1].startswith("warning: jax-cuda13-plugin 0.12.1 installed, but JAX")
