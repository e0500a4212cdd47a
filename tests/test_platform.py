"""cliquejax.platform without the CPU package's part (tests/cpu/test_platform.py): no XLA:CPU
set-up on an accelerator or without `cliquejax/cpu/`, and where the compilation cache lives."""

import importlib.util

from cliquejax import platform


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
