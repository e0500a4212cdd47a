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

from cliquejax.train.loop import StepLog
from tests.conftest import DATA_DIR, host_devices

pytestmark = pytest.mark.slow  # every test here starts launch.py, then kills or signals it

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
    computes the same bits, and the launches after the first skip compiling."""
    return dict(os.environ, XLA_FLAGS=host_devices(1),
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


def launch_plain(env, *args) -> tuple[int, str, str]:
    """launch.py with `args` only (no TINY config): what reads a run's config.json."""
    done = subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    return done.returncode, done.stdout, done.stderr


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


def read_metrics(workdir) -> list[dict]:
    """The rows of metrics.jsonl, without what the host timed (`loop.StepLog.TIMING`: step
    time, images/s, memory), which differs from run to run."""
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [{k: v for k, v in row.items() if k not in StepLog.TIMING} for row in rows]


def last_train_record(workdir) -> dict:
    return [record for record in read_metrics(workdir) if record["split"] == "train"][-1]


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
    return workdir, results, err


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
    # of a run from scratch is too short a window to kill it reliably inside it.
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


def test_step_checkpoints_resume_mid_epoch_bitwise(env, reference, tmp_path):
    """train.checkpoint_every_steps=10: checkpoints inside the epoch; a run that lost
    everything after step 30 (its later checkpoint removed, as a kill leaves it) resumes
    there and ends with the uninterrupted run's parameters and metrics, the window and
    epoch means included (their sums travel in the checkpoint)."""
    workdir = tmp_path / "run"
    every = "--config.train.checkpoint_every_steps=10"
    code, _, err = launch(env, workdir, every, "--config.train.max_steps=35")
    assert code == 0, err[-3000:]
    assert committed_steps(workdir) == [30, 35]  # 10, 20 rotated out (keep_checkpoints=2)
    shutil.rmtree(workdir / "checkpoints" / "35")
    os.remove(workdir / "results.json")
    code, _, err = launch(env, workdir, every)
    assert code == 0, err[-3000:]
    assert_finished_like(reference, workdir)
    assert read_metrics(workdir) == read_metrics(reference[0])
    assert any(row["split"] == "train_step" for row in read_metrics(workdir))


def test_more_epochs_on_resume_continue_an_sgdr_run(env, reference, tmp_path):
    """SGDR's cycles do not depend on train.epochs: a finished run given a third epoch
    trains it, and records the change."""
    workdir = copy_reference(reference, tmp_path / "run")
    code, out, err = launch(env, workdir, "--config.train.epochs=3")
    assert code == 0, err[-3000:]
    results = json.loads(out.strip().splitlines()[-1])
    assert results["steps"] == 3 * STEPS_PER_EPOCH and results["epochs"] == 3.0
    with open(workdir / "changes.jsonl") as handle:
        assert json.loads(handle.readline())["changes"] == {"train.epochs": [2, 3]}


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
    # The copy holds epoch 2's rows without its checkpoint (a kill -9 while step 88
    # committed): they are dropped on resume and written again, once, bit for bit.
    assert read_metrics(workdir) == read_metrics(reference[0])


def edit_config_json(workdir, **fields) -> None:
    """Makes workdir/config.json say the run was made with `fields` ("train.epochs"...)."""
    with open(workdir / "config.json") as handle:
        config = json.load(handle)
    for name, value in fields.items():
        group, field = name.split(".")
        config[group][field] = value
    with open(workdir / "config.json", "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)


def test_non_finite_step_stops_and_keeps_the_checkpoints(env, reference, tmp_path):
    workdir = copy_reference(reference, tmp_path / "run")
    # A run made with a third epoch and peak lr 1e30 (a changed recipe would be refused):
    # epoch 3's SGDR restart at the peak lr overflows the loss at once.
    edit_config_json(workdir, **{"train.epochs": 3, "optimizer.lr": 1e30})
    before = snapshot(workdir / "checkpoints")
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
    # Momentum 0 drops SGD's trace from the optimizer state: config.json edited to say so
    # (else the changed recipe is refused first), the checkpoint does not fit.
    edit_config_json(workdir, **{"optimizer.momentum": 0})
    before = snapshot(workdir)
    code, _, err = launch(env, workdir, "--config.optimizer.momentum=0")
    message = one_line_error(err, alone=True)
    assert code == 2, err[-3000:]
    assert message.startswith(f"error: checkpoint step {TOTAL_STEPS} does not fit the "
                              "configuration: opt_state/"), message
    assert "/trace/" in message.split(": ")[2].split()[0], message  # SGD's momentum
    assert "only in the checkpoint" in message
    assert snapshot(workdir) == before  # config.json included


def overwrite_starts_anew(env, workdir, before) -> None:
    """--overwrite trains from step 0 and moves the whole old run, unchanged, aside."""
    code, _, err = launch(env, workdir, "--overwrite", "--config.train.max_steps=3")
    assert code == 0, err[-3000:]
    results = read_results(workdir)
    assert results["steps"] == 3 and not results["resumed"]
    assert committed_steps(workdir) == [3]
    aside = [name for name in os.listdir(workdir) if name.startswith("previous-")]
    assert len(aside) == 1 and snapshot(workdir / aside[0]) == before


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
        f"error: {workdir} holds a run made with another config (model.K: 8 -> 4; "
        "model.widths: [16, 16, 16] -> [16, 16, 32]); resuming would mix two runs: use "
        "another --workdir, or --overwrite to move the old run aside and start anew"), err
    assert snapshot(workdir) == before
    overwrite_starts_anew(env, workdir, before)


def test_batch_the_devices_do_not_divide_is_a_one_line_error(env, tmp_path):
    eight = dict(env, XLA_FLAGS=host_devices(8))
    code, _, err = launch(eight, tmp_path / "run", "--config.train.batch_size=30")
    assert code == 2 and one_line_error(err, alone=True) == (
        "error: train.batch_size=30 is not divisible by the 8 devices; allowed: a multiple "
        "of 8"), err


# --- a run directory's config.json, lock, checksums, idempotent results ---


def test_console_shows_each_evaluation_and_a_summary(reference):
    workdir, results, err = reference
    lines = [line.strip() for line in re.split(r"[\r\n]", err) if line.strip()]
    tests = [r for r in read_metrics(workdir) if r["split"] == "test"]
    for record, epoch in zip(tests, (1, 2), strict=True):
        expected = (f"epoch {epoch} (step {record['step']}): test accuracy "
                    f"{100 * record['accuracy']:.2f}%")
        assert any(line.startswith(expected) for line in lines), (expected, err[-2000:])
    final = f"{100 * results['final_test_accuracy']:.2f}%"
    summary = lines[-3:]  # printed after the bar closes, before the JSON line on stdout
    assert summary[0].startswith(f"done: 2 epochs ({TOTAL_STEPS} steps) in "), summary
    assert f"test accuracy {final} final" in summary[0], summary
    assert summary[1:] == [f"curves: {workdir / 'curves.png'}",
                           f"results: {workdir / 'results.json'}"], summary


def test_eval_reads_the_runs_config_json_and_refuses_another(env, reference, tmp_path):
    workdir = copy_reference(reference, tmp_path / "run")
    code, out, err = launch_plain(env, f"--workdir={workdir}", "--mode=eval")
    assert code == 0, err[-3000:]
    evaluated = json.loads(out.strip().splitlines()[-1])
    assert evaluated["step"] == TOTAL_STEPS
    assert evaluated["test_accuracy"] == reference[1]["final_test_accuracy"]
    assert evaluated["params_fingerprint"] == reference[1]["params_fingerprint"]
    before = snapshot(workdir)
    # The run is binary (MBCliqueNet K=4); evaluating it as another network is refused.
    code, _, err = launch(env, workdir, "--mode=eval", "--config.model.K=8",
                          "--config.train.eval_batch_size=64")
    message = one_line_error(err, alone=True)
    assert code == 2 and message.startswith(
        f"error: --config differs from the run in {workdir} (model.K: 4 -> 8); --mode=eval "
        "reads the run's config.json"), message  # eval_batch_size may differ: not named
    assert snapshot(workdir) == before  # eval.json untouched
    missing = tmp_path / "missing"
    code, _, err = launch_plain(env, f"--workdir={missing}", "--mode=eval")
    assert code == 2 and one_line_error(err, alone=True).startswith(
        f"error: --workdir='{missing}' does not exist"), err
    assert not os.path.exists(missing)


def test_resuming_with_another_recipe_is_refused_and_allowed_changes_recorded(env, reference,
                                                                               tmp_path):
    workdir = copy_reference(reference, tmp_path / "run")
    before = snapshot(workdir)
    code, _, err = launch(env, workdir, "--config.train.epochs=3", "--config.train.batch_size=16",
                          "--config.optimizer.lr=0.05", "--config.seed=1")
    assert code == 2 and one_line_error(err, alone=True) == (
        f"error: {workdir} holds a run made with another config (optimizer.lr: 0.1 -> 0.05; "
        "seed: 0 -> 1; train.batch_size: 32 -> 16); resuming would mix two runs: use another "
        "--workdir, or --overwrite to move the old run aside and start anew"), err
    assert snapshot(workdir) == before
    # A finished run run again, with a change that cannot alter it, and a stale lock left by
    # a process that has ended: nothing is trained, results.json keeps its measured time.
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    (workdir / "run.lock").write_text(f"{ended.stdout.strip()} {os.uname().nodename}\n")
    code, out, err = launch(env, workdir, "--config.train.log_every_steps=7")
    assert code == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1]) == read_results(workdir) == reference[1]
    assert read_metrics(workdir) == read_metrics(reference[0])
    with open(workdir / "changes.jsonl") as handle:
        changes = [json.loads(line) for line in handle]
    assert [(c["step"], c["changes"]) for c in changes] == [
        (TOTAL_STEPS, {"train.log_every_steps": [5, 7]})]
    with open(workdir / "config.json") as handle:
        assert json.load(handle)["train"]["log_every_steps"] == 7
    assert not os.path.exists(workdir / "run.lock")


def test_a_second_process_on_the_workdir_is_refused(env, reference, tmp_path):
    workdir = copy_reference(reference, tmp_path / "run", upto=STEPS_PER_EPOCH)
    first = Launch(env, workdir)
    first.wait_for_step(STEPS_PER_EPOCH + 1)
    first.process.send_signal(signal.SIGSTOP)  # still training, whatever the second's start
    try:
        code, _, err = launch(env, workdir)
    finally:
        first.process.send_signal(signal.SIGCONT)
    assert code == 2 and one_line_error(err, alone=True) == (
        f"error: {workdir} is in use by process {first.process.pid} on {os.uname().nodename} "
        f"(lock file {workdir / 'run.lock'}); wait for it to end, or use another --workdir "
        "(delete the lock file only if no such process runs)"), err
    code, _, err = first.finish()
    assert code == 0, err[-3000:]
    assert_finished_like(reference, workdir)
    assert read_metrics(workdir) == read_metrics(reference[0])  # not interleaved


def test_overwrite_with_the_same_config_starts_anew(env, reference, tmp_path):
    workdir = copy_reference(reference, tmp_path / "run")
    before = snapshot(workdir)
    overwrite_starts_anew(env, workdir, before)


def referenced_values(step_dir) -> list[tuple[str, int, int]]:
    """(data file, offset, length) of every array chunk the step's OCDBT tree points to.

    The data files also hold superseded tree nodes and chunks of earlier commits, which a
    restore never reads, so damage aimed at "the largest file" may miss (it did on CI).
    """
    import tensorstore as ts

    base = step_dir / "state" / "ocdbt.process_0"
    store = ts.KvStore.open(f"file://{base}/").result()
    version = ts.ocdbt.dump(store).result()["versions"][-1]
    assert version["root_height"] == 0  # the tiny run's tree is one leaf node
    values = []
    for entry in ts.ocdbt.dump(store, version["root"]["location"]).result()["entries"]:
        if "indirect_value" in entry:  # "value::d/<file>:<offset>:<length>"
            name, offset, length = entry["indirect_value"].split("::")[1].rsplit(":", 2)
            values.append((str(base / name), int(offset), int(length)))
    assert values, f"no array data referenced in {base}"
    return values


def damage(step_dir, how: str) -> None:
    """Damages the largest array chunk a restore of the step reads: truncates its file
    where the chunk starts, or flips 16 bytes in its middle (it still decodes)."""
    path, offset, length = max(referenced_values(step_dir), key=lambda value: value[2])
    if how == "truncate":
        os.truncate(path, offset)
        return
    data = bytearray(open(path, "rb").read())
    middle = offset + length // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    with open(path, "wb") as handle:
        handle.write(bytes(data))


def test_damaged_checkpoints_fall_back_to_the_previous_good_one(env, reference, tmp_path):
    # Truncated: resume falls back to step 44, moves step 88 aside and trains it again.
    workdir = copy_reference(reference, tmp_path / "truncated")
    damage(workdir / "checkpoints" / str(TOTAL_STEPS), "truncate")
    code, _, err = launch(env, workdir)
    assert code == 0, err[-3000:]
    # nothing of the failed reads after the warning (Orbax's coroutines, asyncio's futures)
    assert not re.search(r"Traceback|Exception ignored|never retrieved|^E\d{4} ", err, re.M)
    assert re.search(rf"warning: checkpoint {workdir}/checkpoints/{TOTAL_STEPS} cannot be read "
                     rf"\(.+\); falling back to step {STEPS_PER_EPOCH}\n", err), err[-3000:]
    assert_finished_like(reference, workdir)
    assert read_metrics(workdir) == read_metrics(reference[0])
    assert os.listdir(workdir / "checkpoints-corrupt") == [str(TOTAL_STEPS)]
    # Flipped bytes that still decode: the checksum tells; eval uses step 44, moves nothing.
    workdir = copy_reference(reference, tmp_path / "flipped")
    damage(workdir / "checkpoints" / str(TOTAL_STEPS), "flip")
    code, out, err = launch_plain(env, f"--workdir={workdir}", "--mode=eval")
    assert code == 0, err[-3000:]
    assert err.splitlines()[0] == (
        f"warning: checkpoint {workdir}/checkpoints/{TOTAL_STEPS} is corrupt (its state does "
        f"not match the checksum saved with it); falling back to step {STEPS_PER_EPOCH}"), err
    assert json.loads(out.strip().splitlines()[-1])["step"] == STEPS_PER_EPOCH
    # None left: one line, nothing moved.
    damage(workdir / "checkpoints" / str(STEPS_PER_EPOCH), "truncate")
    before = snapshot(workdir)
    code, _, err = launch(env, workdir)
    assert code == 2 and one_line_error(err) == (
        f"error: no good checkpoint in {workdir}/checkpoints (steps {STEPS_PER_EPOCH}, "
        f"{TOTAL_STEPS} are damaged); start anew with --overwrite (the run is moved "
        "aside) or another --workdir"), err
    assert snapshot(workdir) == before


def test_disk_full_during_a_save_stops_at_once(env, reference, tmp_path):
    """Files limited to 30 kB (RLIMIT_FSIZE: root ignores permissions, not limits): the
    array file of checkpoint 88 cannot be written; metrics, config.json are smaller."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    workdir = copy_reference(reference, tmp_path / "run", upto=STEPS_PER_EPOCH)
    done = subprocess.run([sys.executable, "launch.py", *TINY, f"--workdir={workdir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT,
                          preexec_fn=limit_file_size)
    assert done.returncode == 1 and one_line_error(done.stderr) == (
        f"error: saving checkpoint step {TOTAL_STEPS} in {workdir}/checkpoints failed (File "
        f"too large); training stopped; the last good checkpoint (step {STEPS_PER_EPOCH}) is "
        "kept"), done.stderr[-3000:]
    assert committed_steps(workdir) == [STEPS_PER_EPOCH]
    assert not os.path.exists(workdir / "results.json")


def test_a_signal_during_the_last_step_still_ends_with_its_exit_code(tmp_path, monkeypatch):
    """SIGINT while the last step or its evaluation runs: the run completes (checkpoint,
    results.json), then the command exits 130 rather than 0 as if nothing had come."""
    from cliquejax.train import loop
    from tests.conftest import tiny_digits_config

    config = tiny_digits_config(epochs=1, max_steps=2)
    stop_after = loop.SignalFlag.stop_after

    def signalled_at_the_end(self, done):
        if done == 2:
            os.kill(os.getpid(), signal.SIGINT)  # caught by the flag's handler
        return stop_after(self, done)

    monkeypatch.setattr(loop.SignalFlag, "stop_after", signalled_at_the_end)
    with pytest.raises(loop.Preempted) as stopped:
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert stopped.value.exit_code == 130 and "the run is complete" in str(stopped.value)
    with open(tmp_path / "run" / "results.json") as f:
        assert json.load(f)["steps"] == 2


def stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "T"


def test_readers_leave_a_save_in_flight_alone(env, reference, tmp_path):
    """eval and export open a run whose checkpoint is being written (the writer frozen
    between writing it and committing it) without touching it: the Orbax manager they open
    used to delete the save's temporary directory, and the writer then died on its commit."""
    workdir = copy_reference(reference, tmp_path / "run", upto=STEPS_PER_EPOCH)
    script = os.path.join(ROOT, "tests", "scripts", "stop_mid_save.py")
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        writer = subprocess.Popen([sys.executable, script, str(TOTAL_STEPS), *TINY,
                                   f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=out,
                                  stderr=err)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not stopped(writer.pid):  # the signal: it froze itself mid-save
            assert writer.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "err").read_text()[-3000:]
            time.sleep(0.01)
        checkpoints = workdir / "checkpoints"
        in_flight = snapshot(checkpoints)
        assert f"{TOTAL_STEPS}{TMP_SUFFIX}" in os.listdir(checkpoints)
        code, out, err = launch_plain(env, f"--workdir={workdir}", "--mode=eval")
        assert code == 0 and json.loads(out.splitlines()[-1])["step"] == STEPS_PER_EPOCH, err
        done = subprocess.run([sys.executable, "-m", "cliquejax.export", f"--workdir={workdir}",
                               f"--out={tmp_path / 'm.clqx'}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr[-3000:]
        assert snapshot(checkpoints) == in_flight
    finally:
        writer.send_signal(signal.SIGCONT)
    assert writer.wait(timeout=TIMEOUT) == 0, (tmp_path / "err").read_text()[-3000:]
    assert committed_steps(workdir) == [STEPS_PER_EPOCH, TOTAL_STEPS]
    assert_finished_like(reference, workdir)
