"""Every device, every host: 8 CPU devices give the 1-device result; two processes on
localhost (jax.distributed, gloo) give the one-process result."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import DATA_DIR, ROOT, host_devices

pytestmark = pytest.mark.slow  # every test here starts processes (8 devices, two processes)

SCRIPT = os.path.join(ROOT, "tests", "scripts", "sharded_steps.py")


def run_steps(model: str, devices: int, out: str, steps: int, kernels: str = "auto",
              bn: str = "global") -> dict:
    env = dict(os.environ, XLA_FLAGS=host_devices(devices))
    done = subprocess.run([sys.executable, SCRIPT, model, out, str(steps), kernels, bn],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(out))


# The global batch's BN statistics and gradients are reduced across devices in another order
# than on one device: float32 rounding (~1e-7 relative; the first losses differ by 2e-6).
# CliqueNet stays within 1e-5 for several steps. MBCliqueNet does not, binary or not
# (measured, u-MBCliqueNet at lr 0.01: 7e-5 apart in the second loss, 8e-3 in the fourth;
# the binary net also flips the signs of latent weights near 0). We attribute it to the
# M-filter, shared by every filter of a block: one step moves the whole block at once.
# So MBCliqueNet is compared over one step, whose updated parameters carry the global BN
# statistics, the gradients through the STE and the modulation, their reduction and the
# optimizer update. The reference (stock) operations run CliqueNet, the CPU kernels (`auto`
# on this CPU host) MBCliqueNet; test_kernels.py checks that the two kernels agree.
@pytest.mark.parametrize("model,steps,kernels", [("mbcliquenet", 1, "auto"),
                                                 ("cliquenet", 4, "reference")])
def test_eight_devices_equal_one(model, steps, kernels, tmp_path):
    one = run_steps(model, 1, str(tmp_path / "one.npz"), steps, kernels)
    eight = run_steps(model, 8, str(tmp_path / "eight.npz"), steps, kernels)
    assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5, atol=1e-5)
    for name in one:
        if name not in ("losses", "devices"):
            np.testing.assert_allclose(eight[name], one[name], rtol=1e-5, atol=1e-5,
                                       err_msg=name)


# train.bn_statistics=per_device: the shard_map step on 8 devices (each normalising its
# own 8 examples, one pmean of the gradients) against the same step computed by hand on one
# device, shard by shard. One step, for MBCliqueNet's reason above; float32 sums in another
# order (the pmean against a Python sum): measured 2e-6 apart, compared at 1e-5.
def test_per_device_bn_equals_per_shard_reference(tmp_path):
    eight = run_steps("mbcliquenet", 8, str(tmp_path / "eight.npz"), 1, "auto", "per_device")
    assert int(eight["devices"]) == 8
    np.testing.assert_allclose(eight["losses"], eight["reference/losses"], rtol=1e-5, atol=1e-5)
    names = [name for name in eight if name not in ("losses", "devices")
             and not name.startswith("reference/")]
    assert names and all(f"reference/{name}" in eight for name in names)
    for name in names:
        np.testing.assert_allclose(eight[name], eight[f"reference/{name}"], rtol=1e-5,
                                   atol=1e-5, err_msg=name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_pair(argvs, env, timeout) -> list[tuple[str, str]]:
    """Two processes (`python *argv` each, at once, from the repository root) that must both
    succeed; their (stdout, stderr). A pair still running after `timeout` seconds is killed
    and fails the test (hung in a collective?) instead of hanging CI."""
    procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv in argvs]
    deadline = time.monotonic() + timeout  # for the pair, not for each process
    try:
        outputs = [p.communicate(timeout=max(0.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        pytest.fail(f"the two processes did not finish in {timeout} s (hung in a collective?)")
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    return outputs


TINY = ["--config=configs/mbclique_digits.py", "--config.model.widths=16,16,32",
        "--config.model.layers=2,2,2", f"--config.data.data_dir={DATA_DIR}",
        "--config.train.epochs=1", "--config.train.batch_size=32",
        "--config.train.eval_batch_size=64"]


def test_two_processes_equal_one(tmp_path):
    # The one-process reference has the same 2 devices: each device then gets the same shard
    # of every global batch in both runs, and an all-reduce of two values is exact whatever
    # carries it (XLA in one process, gloo across two), so the runs must agree bitwise.
    single = subprocess.run(
        [sys.executable, "launch.py", *TINY, f"--workdir={tmp_path / 'one'}"], cwd=ROOT,
        env=dict(os.environ, XLA_FLAGS=host_devices(2)),
        capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    port, workdir = free_port(), tmp_path / "two"
    env = dict(os.environ, XLA_FLAGS=host_devices(1))
    outputs = run_pair([["launch.py", *TINY, f"--workdir={workdir}",
                         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                         f"--process_id={i}"] for i in range(2)], env, timeout=600)
    one = json.loads(single.stdout.strip().splitlines()[-1])
    two = json.loads(outputs[0][0].strip().splitlines()[-1])
    # Only process 0 reports (gloo may print its own connection lines on either process).
    assert not [line for line in outputs[1][0].splitlines() if line.startswith("{")]
    assert (one["processes"], one["devices"]) == (1, 2)
    assert (two["processes"], two["devices"]) == (2, 2)
    assert two["steps"] == one["steps"] > 0
    assert two["params_fingerprint"] == one["params_fingerprint"]
    assert two["final_test_loss"] == one["final_test_loss"]
    assert json.loads((workdir / "results.json").read_text())["processes"] == 2


SIGNAL_SCRIPT = os.path.join(ROOT, "tests", "scripts", "signal_run.py")


def run_signal_pair(workdir, env) -> list[dict]:
    """Both processes of tests/scripts/signal_run.py; their reports. A pair still running
    after 10 minutes fails the test instead of hanging CI: a hang never ends, while a run
    here (about 6 s idle) took over 3 minutes on a loaded 2-core machine, compiling twice."""
    port = free_port()
    outputs = run_pair([[SIGNAL_SCRIPT, str(port), str(i), str(workdir), "3"]
                        for i in range(2)], env, timeout=600)
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def test_sigterm_on_one_process_saves_and_stops_both_without_a_collective_per_step(tmp_path):
    from cliquejax.train.loop import SIGNAL_SYNC_STEPS

    # Twice over one fresh compilation cache: the second run finds process 0's executables
    # there, which hung both processes in their first step until several processes on
    # XLA:CPU stopped using the cache (`platform.no_cache_across_cpu_processes`).
    env = dict(os.environ, XLA_FLAGS=host_devices(1),
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    for run in ("first", "second"):
        workdir = tmp_path / run
        reports = run_signal_pair(workdir, env)
        # Signalled after step 3 (process 1 only): both agree at the next sync point, read
        # one step later, and stop there with one agreement per SIGNAL_SYNC_STEPS steps.
        stopped = SIGNAL_SYNC_STEPS + 1
        assert reports[0] == reports[1] == {"steps": stopped, "agreements": 1,
                                            "exit_code": 143}
        assert sorted(os.listdir(workdir / "checkpoints")) == [str(stopped)]


def slurm_port() -> int:
    """A free port among those JAX's Slurm detection picks (61440 + SLURM_JOB_ID % 4096)."""
    for port in range(61440 + os.getpid() % 4096, 61440 + 4096):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free port in 61440-65535")


def test_an_srun_job_on_localhost_starts_jax_distributed_without_the_flag(tmp_path):
    """The variables srun sets for two tasks on one node: without --distributed, both
    processes join one run (not one training, the other stopped by the lock)."""
    workdir = tmp_path / "run"
    port = slurm_port()
    procs = []
    for task in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   SLURM_JOB_ID=str(port - 61440), SLURM_STEP_NODELIST="localhost",
                   SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID=str(task),
                   SLURM_LOCALID=str(task))
        procs.append(subprocess.Popen(
            [sys.executable, "launch.py", *TINY, "--config.train.max_steps=2",
             f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    results = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert (results["processes"], results["steps"]) == (2, 2)


def test_a_job_jax_cannot_start_and_a_task_alone_on_a_locked_workdir_say_so(tmp_path):
    env = dict(os.environ, OMPI_COMM_WORLD_SIZE="2")
    workdir = tmp_path / "run"
    run = lambda *argv, env=env: subprocess.run(
        [sys.executable, "launch.py", *TINY, f"--workdir={workdir}", *argv], cwd=ROOT,
        env=env, capture_output=True, text=True, timeout=300)
    done = run()
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: the environment shows a job of several processes (OMPI_COMM_WORLD_SIZE=2) "
        "but jax.distributed cannot start from it (coordinator_address should be defined.); "
        "allowed: --distributed where JAX detects the cluster, --coordinator_address="
        "HOST:PORT --num_processes=N --process_id=I, or --nodistributed (one process)"]
    # --nodistributed: each task alone; the one that finds the workdir taken says why
    workdir.mkdir()
    (workdir / "run.lock").write_text(f"{os.getpid()} {os.uname().nodename}\n")
    done = run("--nodistributed")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith(
        "; this process is one task of a job of several (OMPI_COMM_WORLD_SIZE=2) without "
        "jax.distributed: run the tasks as one job (drop --nodistributed, or "
        "--distributed), or give each its own --workdir"), done.stderr
