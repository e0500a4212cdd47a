"""Surviving interruptions, end to end through launch.py on the bundled digits.

SIGTERM / SIGINT mid-epoch save a checkpoint and exit 143 / 130; SIGKILL and a checkpoint
write cut short resume from the last complete checkpoint. Every resumed run ends with the
parameters (fingerprint) of one uninterrupted run. A non-finite step, a checkpoint or a
config.json of another model and a batch the devices do not divide stop with a one-line
error and leave the checkpoints as they were.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import DATA_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 1437 // 32  # the digits' train split, batch 32: 44 steps per epoch
TOTAL_STEPS = 2 * STEPS_PER_EPOCH
TIMEOUT = 600
# Orbax 0.12.8 writes step N into this directory and renames it to `N` on commit.
TMP_SUFFIX = ".orbax-checkpoint-tmp"
TINY = ["--config=configs/mbclique_digits.py", "--config.model.widths=16,16,32",
        "--config.model.layers=2,2,2", f"--config.data.data_dir={DATA_DIR}",
        "--config.train.epochs=2", "--config.train.batch_size=32",
        "--config.train.eval_batch_size=128"]
STOPPED = re.compile(r"stopped by signal at step (\d+): checkpoint saved in (\S+); "
                     r"run the same command to resume")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The launches' environment. They share a JAX compilation cache: a cached executable
    computes the same bits and saves each launch ~25 s of compiling on 2 cores."""
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _drain(stream, sink: bytearray) -> None:
    for chunk in iter(lambda: os.read(stream.fileno(), 4096), b""):
        sink.extend(chunk)


class Launch:
    """`launch.py TINY --workdir=... *args` in the background, its output collected as it
    comes (the progress bar on stderr tells how far training got)."""

    def __init__(self, env, workdir, *args):
        self.process = subprocess.Popen(
            [sys.executable, "launch.py", *TINY, f"--workdir={workdir}", *args], cwd=ROOT,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out, self.err = bytearray(), bytearray()
        self.readers = [threading.Thread(target=_drain, args=pair, daemon=True)
                        for pair in ((self.process.stdout, self.out),
                                     (self.process.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    def wait_for_step(self, step: int) -> int:
        """Blocks until the progress bar shows `step` or later (so training runs and the
        loop's signal handlers are installed); returns the step shown."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            shown = re.findall(r"step=(\d+)", bytes(self.err).decode(errors="replace"))
            if shown and int(shown[-1]) >= step:
                return int(shown[-1])
            assert self.process.poll() is None, f"ended early:\n{self.err[-3000:].decode()}"
            time.sleep(0.005)
        self.process.kill()
        pytest.fail(f"step {step} not reached in {TIMEOUT} s")

    def finish(self) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) once the process has ended."""
        self.process.wait(timeout=TIMEOUT)
        for reader in self.readers:
            reader.join()
        return self.process.returncode, self.out.decode(), self.err.decode(errors="replace")


def launch(env, workdir, *args) -> tuple[int, str, str]:
    return Launch(env, workdir, *args).finish()


def one_line_error(stderr: str, alone: bool = False) -> str:
    """stderr's last non-empty line (the progress bar redraws with carriage returns), after
    checking that no traceback was printed; `alone`: the only line (stopped before training)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in re.split(r"[\r\n]", stderr) if line.strip()]
    assert lines and (len(lines) == 1 or not alone), stderr[-3000:]
    return lines[-1]


def snapshot(directory) -> dict:
    """Every file (sha256 of its bytes) and directory under `directory`."""
    entries = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            entries[os.path.relpath(os.path.join(root, name), directory)] = "dir"
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                entries[os.path.relpath(path, directory)] = hashlib.sha256(
                    handle.read()).hexdigest()
    return entries


def committed_steps(workdir) -> list[int]:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    return sorted(int(name) for name in names if name.isdigit())


def read_results(workdir) -> dict:
    with open(os.path.join(workdir, "results.json")) as handle:
        return json.load(handle)


def last_train_record(workdir) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [record for record in records if record["split"] == "train"][-1]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """(workdir, results) of the uninterrupted two-epoch run the others must equal."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    code, out, err = launch(env, workdir)
    assert code == 0, err[-3000:]
    results = json.loads(out.strip().splitlines()[-1])
    assert results == read_results(workdir)
    assert results["steps"] == TOTAL_STEPS and not results["resumed"]
    assert committed_steps(workdir) == [STEPS_PER_EPOCH, TOTAL_STEPS]
    return workdir, results


def copy_reference(reference, workdir, upto: int = TOTAL_STEPS):
    """A copy of the reference run as it was after step `upto` (an epoch end): later
    checkpoints and results.json removed."""
    shutil.copytree(reference[0], workdir)
    for step in committed_steps(workdir):
        if step > upto:
            shutil.rmtree(workdir / "checkpoints" / str(step))
    if upto < TOTAL_STEPS:
        os.remove(workdir / "results.json")
    return workdir


def assert_finished_like(reference, workdir) -> None:
    results = read_results(workdir)
    assert results["resumed"] and results["steps"] == TOTAL_STEPS
    assert results["params_fingerprint"] == reference[1]["params_fingerprint"]


def stop_by_signal(env, workdir, sig) -> tuple[int, int]:
    """Starts a fresh run, sends `sig` once it trains; returns (exit code, step saved)."""
    run = Launch(env, workdir)
    run.wait_for_step(1)
    run.process.send_signal(sig)
    code, _, err = run.finish()
    stopped = STOPPED.fullmatch(one_line_error(err))
    assert stopped, err[-3000:]
    assert stopped[2] == os.path.join(workdir, "checkpoints")
    return code, int(stopped[1])


def test_sigterm_mid_epoch_saves_and_the_same_command_resumes(env, reference, tmp_path):
    workdir = tmp_path / "run"
    code, saved = stop_by_signal(env, workdir, signal.SIGTERM)
    assert code == 143
    # Sent at the first step shown: the checkpoint lands mid-epoch (in practice step 2-10).
    assert 0 < saved < TOTAL_STEPS and committed_steps(workdir)[-1] == saved
    assert not os.path.exists(workdir / "results.json")
    code, _, err = launch(env, workdir)
    assert code == 0, err[-3000:]
    # The data iterator restarts at batch `saved` of the same shuffled order: resumed
    # parameters are bitwise those of the uninterrupted run.
    assert_finished_like(reference, workdir)


def test_sigint_saves_and_exits_130(env, tmp_path):
    workdir = tmp_path / "run"
    code, saved = stop_by_signal(env, workdir, signal.SIGINT)
    assert code == 130
    assert 0 < saved < TOTAL_STEPS and committed_steps(workdir)[-1] == saved


def test_sigkill_mid_epoch_resumes_from_the_last_complete_checkpoint(env, reference,
                                                                      tmp_path):
    # The reference run after epoch 1, resumed and killed at the first step it shows: epoch 2
    # takes ~2 s, too short a window to kill a run from scratch reliably inside it.
    workdir = copy_reference(reference, tmp_path / "run", upto=STEPS_PER_EPOCH)
    run = Launch(env, workdir)
    shown = run.wait_for_step(STEPS_PER_EPOCH + 1)
    run.process.kill()
    code, _, _ = run.finish()
    assert code == -signal.SIGKILL and shown < TOTAL_STEPS
    assert committed_steps(workdir) == [STEPS_PER_EPOCH]
    assert not os.path.exists(workdir / "results.json")
    code, _, err = launch(env, workdir)
    assert code == 0, err[-3000:]
    assert_finished_like(reference, workdir)
    # Epoch 2's mean loss, accuracy, flip ratio... over its 44 batches, all bitwise equal:
    # the same examples in the same order, none skipped or repeated.
    assert last_train_record(workdir) == last_train_record(reference[0])


def test_checkpoint_write_cut_short_is_ignored(env, reference, tmp_path):
    workdir = copy_reference(reference, tmp_path / "run", upto=STEPS_PER_EPOCH)
    checkpoints = workdir / "checkpoints"
    # What a kill during the save of step 60 leaves: everything in tmp directories, no
    # commit_success.txt, a missing item and half-written array files.
    leftover = checkpoints / f"60{TMP_SUFFIX}"
    shutil.copytree(checkpoints / str(STEPS_PER_EPOCH), leftover)
    os.remove(leftover / "commit_success.txt")
    shutil.rmtree(leftover / "meta")
    state = leftover / f"state{TMP_SUFFIX}"
    os.rename(leftover / "state", state)
    for path in (state / "ocdbt.process_0" / "d").iterdir():
        os.truncate(path, os.path.getsize(path) // 2)
    code, _, err = launch(env, workdir)
    assert code == 0, err[-3000:]
    assert_finished_like(reference, workdir)
    assert sorted(os.listdir(checkpoints)) == [str(STEPS_PER_EPOCH), str(TOTAL_STEPS)]


def test_non_finite_step_stops_and_keeps_the_checkpoints(env, reference, tmp_path):
    workdir = copy_reference(reference, tmp_path / "run")
    before = snapshot(workdir / "checkpoints")
    # A third epoch: SGDR restarts at the peak lr, here 1e30; the loss overflows at once.
    code, _, err = launch(env, workdir, "--config.train.epochs=3", "--config.optimizer.lr=1e30")
    message = one_line_error(err)
    failed = re.fullmatch(r"error: non-finite loss or gradient at step (\d+); training stopped "
                          r"without saving the bad state; the last good checkpoint "
                          rf"\(step {TOTAL_STEPS}\) is kept", message)
    assert code == 1 and failed, err[-3000:]
    bad_step = int(failed[1])
    assert TOTAL_STEPS < bad_step <= 3 * STEPS_PER_EPOCH
    assert snapshot(workdir / "checkpoints") == before
    assert max(committed_steps(workdir)) < bad_step


def test_checkpoint_that_does_not_fit_is_refused_untouched(env, reference, tmp_path):
    workdir = copy_reference(reference, tmp_path / "run")
    before = snapshot(workdir)
    # Momentum 0 drops SGD's trace from the optimizer state (not a model field: config.json
    # lets it through, the checkpoint does not).
    code, _, err = launch(env, workdir, "--config.optimizer.momentum=0")
    message = one_line_error(err, alone=True)
    assert code == 2, err[-3000:]
    assert message.startswith(f"error: checkpoint step {TOTAL_STEPS} does not fit the "
                              "configuration: opt_state/"), message
    assert message.split(": ")[2].split()[0].endswith("/trace"), message  # flat momentum
    assert "only in the checkpoint" in message
    assert snapshot(workdir) == before  # config.json included


def test_config_json_of_another_model_is_refused_unless_overwrite(env, reference, tmp_path):
    workdir = copy_reference(reference, tmp_path / "run")
    with open(workdir / "config.json") as handle:
        old = json.load(handle)
    old["model"].update(widths=[16, 16, 16], K=8)  # an old run of another model
    with open(workdir / "config.json", "w") as handle:
        json.dump(old, handle, indent=2, sort_keys=True)
    before = snapshot(workdir)
    code, _, err = launch(env, workdir)
    assert code == 2 and one_line_error(err, alone=True) == (
        f"error: {workdir} holds a run of another model (model.K: 8 -> 4; model.widths: "
        "[16, 16, 16] -> [16, 16, 32]); use another --workdir, or --overwrite to move the old "
        "run aside"), err
    assert snapshot(workdir) == before
    code, _, err = launch(env, workdir, "--overwrite", "--config.train.max_steps=3")
    assert code == 0, err[-3000:]
    results = read_results(workdir)
    assert results["steps"] == 3 and not results["resumed"]
    assert committed_steps(workdir) == [3]
    aside = [name for name in os.listdir(workdir) if name.startswith("previous-")]
    assert len(aside) == 1 and snapshot(workdir / aside[0]) == before


def test_batch_the_devices_do_not_divide_is_a_one_line_error(env, tmp_path):
    eight = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    code, _, err = launch(eight, tmp_path / "run", "--config.train.batch_size=30")
    assert code == 2 and one_line_error(err, alone=True) == (
        "error: train.batch_size=30 is not divisible by the 8 devices; allowed: a multiple "
        "of 8"), err
