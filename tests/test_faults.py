"""Bad inputs a user can give, each stopped with one line: through the command line
(launch.py, cliquejax.summary, cliquejax.lower) for config files, npz files, image folders
and TFDS files; in process for the rules behind them (config differences, the workdir lock,
class counts, image sizes, the progress bar's ETA)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cliquejax import report
from cliquejax.data import local_sources
from cliquejax.train import loop, run_dir
from tests.conftest import DATA_DIR, tiny_digits_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config=configs/mbclique_digits.py", "--config.model.widths=16,16,32",
         "--config.model.layers=2,2,2", "--config.train.epochs=1",
         "--config.train.batch_size=16", "--config.train.max_steps=2"]


def run(*args, module=None):
    command = [sys.executable, *(["-m", module] if module else ["launch.py"]), *args]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def one_line(done, code=2) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == code and len(lines) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return lines[0]


def labelled_npz(path, train_labels, test_labels, size=8):
    rng = np.random.default_rng(0)
    images = lambda n: rng.integers(0, 256, (n, size, size), dtype=np.uint8)  # noqa: E731
    np.savez(path, x_train=images(len(train_labels)), y_train=np.asarray(train_labels),
             x_test=images(len(test_labels)), y_test=np.asarray(test_labels))
    return path


@pytest.mark.parametrize("case", ["missing", "syntax", "import"])
def test_config_file_that_cannot_be_loaded_is_one_line(case, tmp_path):
    path = tmp_path / "mine.py"
    if case == "syntax":
        path.write_text("def get_config(:\n")
    if case == "import":
        path.write_text("import no_such_module\n")
    reason = {"missing": "no such file", "syntax": f"invalid syntax ({path}, line 1)",
              "import": "No module named 'no_such_module'"}[case]
    expected = (f"error: --config={path} cannot be loaded ({reason}); allowed: a Python file "
                "with get_config(), such as configs/mbclique_cifar10.py")
    assert one_line(run(f"--config={path}", f"--workdir={tmp_path / 'run'}")) == expected
    assert not os.path.exists(tmp_path / "run")
    if case != "syntax":
        for module in ("cliquejax.summary", "cliquejax.lower"):
            assert one_line(run(f"--config={path}", module=module)) == expected, module


def test_a_config_given_by_path_loads_from_any_directory(tmp_path):
    """Config files import their siblings (`from configs import ...`): given by path, they
    load with the working directory elsewhere; and summary prints no library logging."""
    config = os.path.join(ROOT, "configs", "mbclique_digits.py")
    done = subprocess.run([sys.executable, "-m", "cliquejax.summary", f"--config={config}",
                           "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
    assert json.loads(done.stdout)["classes"] == 10


def test_bad_data_files_are_named_in_one_line(tmp_path):
    """A label out of range, a truncated npz, a non-image in an image folder, a damaged TFDS
    file: each refused at load, before the workdir is created."""
    labels = labelled_npz(tmp_path / "labels.npz", np.arange(64) % 10, [1, 2, 999, 3])
    truncated = tmp_path / "truncated.npz"
    whole = labelled_npz(tmp_path / "whole.npz", np.arange(64) % 10, [1, 2]).read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    folder = tmp_path / "folder"
    for split in ("train", "test"):
        for name in ("a", "b"):
            os.makedirs(folder / split / name)
            for index in range(4):
                Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(
                    folder / split / name / f"{index}.png")
    (folder / "train" / "b" / "notes.png").write_text("not an image")
    tfds_dir = tmp_path / "tfds"
    shutil.copytree(os.path.join(DATA_DIR, "cliquejax_digits"), tfds_dir / "cliquejax_digits")
    shard = next((tfds_dir / "cliquejax_digits").glob("*/cliquejax_digits-train.array_record*"))
    os.truncate(shard, os.path.getsize(shard) // 2)
    cases = [
        (["--config.data.name=npz", f"--config.data.path={labels}"],
         f"error: npz file {labels}: key 'y_test' has label 999; allowed: 0..9 (y_train's "
         "classes 0..9; set data.num_classes if there are more)"),
        (["--config.data.name=npz", f"--config.data.path={truncated}"],
         f"error: npz file {truncated} cannot be read (File is not a zip file); allowed: a "
         "complete file written by numpy.savez with keys x_train, y_train, x_test, y_test"),
        (["--config.data.name=image_folder", f"--config.data.path={folder}"],
         f"error: image file {folder}/train/b/notes.png cannot be read (cannot identify image "
         f"file '{folder}/train/b/notes.png'); allowed: png or jpeg images (remove or replace "
         "the file)"),
        ([f"--config.data.data_dir={tfds_dir}"],
         f"error: data set 'digits' (train) cannot be read from {shard.parent} ("),
    ]
    for overrides, expected in cases:
        workdir = tmp_path / "run"
        message = one_line(run(*SMALL, *overrides, f"--workdir={workdir}"))
        assert message.startswith(expected), (message, expected)
        assert not os.path.exists(workdir)
    assert message.endswith(f"its files are damaged: delete {shard.parent} and prepare it "
                            "again (it is rebuilt from scikit-learn on the next run)")


def test_train_without_config_needs_a_run_to_resume(tmp_path):
    expected = (f"error: --config is required to start a run in {tmp_path} (it holds no "
                "config.json to resume); allowed: --config=configs/<name>.py")
    assert one_line(run(f"--workdir={tmp_path}")) == expected


# --- the rules, in process ---


def test_config_differences_allowed_refused_and_one_sided():
    old = {"seed": 0, "model": {"K": 4}, "optimizer": {"lr": 0.1},
           "train": {"epochs": 2, "log_every_steps": 5, "eval_batch_size": 128}}
    new = json.loads(json.dumps(old))
    new["train"].update(log_every_steps=7, eval_batch_size=64, kernels="fused")
    new["model"]["bn_epsilon"] = 1e-5  # a field newer than the run: changes the network
    new["optimizer"]["lr"] = 0.2
    refused, allowed = run_dir.config_differences(old, new)
    assert refused == ["model.bn_epsilon: '<unset>' -> 1e-05", "optimizer.lr: 0.1 -> 0.2"]
    assert allowed == {"train.eval_batch_size": [128, 64], "train.kernels": ["<unset>", "fused"],
                       "train.log_every_steps": [5, 7]}


@pytest.mark.parametrize("stored", [{}, None, "b1=0.95", {"b1": 0.95}])
def test_resume_compares_optimizer_kwargs_by_the_arguments_they_give(stored, tmp_path):
    """optimizer.kwargs was a dict (`{}` in older runs' config.json, or no field before that)
    and is now a string of keyword arguments: a run resumes when both give the same
    arguments, and is refused, naming the argument, when they do not."""
    config = tiny_digits_config()
    config.optimizer.name = "adamw"
    old = json.loads(config.to_json())
    if stored is None:
        del old["optimizer"]["kwargs"]
    else:
        old["optimizer"]["kwargs"] = stored
    (tmp_path / "config.json").write_text(json.dumps(old))
    os.makedirs(tmp_path / "checkpoints" / "4")  # a run that trained: its config binds
    same = stored in ("b1=0.95", {"b1": 0.95})
    config.optimizer.kwargs = "b1=0.95" if same else ""
    assert run_dir.check_resume(config, str(tmp_path), overwrite=False) == {}
    config.optimizer.kwargs = "b1=0.9" if same else "b1=0.95"
    with pytest.raises(run_dir.ConfigMismatchError,
                       match=re.escape(f"optimizer.kwargs.b1: {0.95 if same else '<unset>'!r}")):
        run_dir.check_resume(config, str(tmp_path), overwrite=False)


def test_workdir_lock_refuses_a_live_holder_and_replaces_a_stale_one(tmp_path):
    lock = run_dir.WorkdirLock(str(tmp_path))
    host = os.uname().nodename
    (tmp_path / run_dir.LOCK_FILE).write_text(f"{os.getppid()} {host}\n")  # alive
    with pytest.raises(run_dir.WorkdirLockedError, match=f"in use by process {os.getppid()}"):
        lock.acquire()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / run_dir.LOCK_FILE).write_text(f"{ended} {host}\n")  # its process has ended
    lock.acquire()
    assert (tmp_path / run_dir.LOCK_FILE).read_text() == f"{os.getpid()} {host}\n"
    lock.release()
    assert not (tmp_path / run_dir.LOCK_FILE).exists()


def test_npz_classes_come_from_the_data_not_the_largest_label(tmp_path):
    path = str(labelled_npz(tmp_path / "gap.npz", [0, 1, 3, 3], [0, 1]))
    with pytest.raises(ValueError, match=r"y_train has no image of class 2 \(its largest label "
                                         r"is 3; 3 classes occur\)"):
        local_sources.NpzSource(path, "train")
    with pytest.raises(ValueError, match=r"no image of class 2 \(data.num_classes=5; 3 classes"):
        local_sources.NpzSource(path, "train", num_classes=5)  # a class that cannot be learnt
    with pytest.raises(ValueError, match=r"label 3; allowed: 0..2 \(data.num_classes=3"):
        local_sources.NpzSource(path, "test", num_classes=3)


def test_images_too_small_for_the_network_are_refused(tmp_path):
    config = tiny_digits_config()
    config.data.name = "npz"
    config.data.path = str(labelled_npz(tmp_path / "tiny.npz", np.arange(64) % 10,
                                        np.arange(10), size=2))
    with pytest.raises(ValueError, match=r"images of 2x2 are too small for model mbcliquenet"):
        loop.Trainer(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_eta_does_not_count_the_first_step(capsys):
    bar = report.ProgressBar(1000)
    time.sleep(1.0)  # the first step compiles
    bar.update(1)
    for _ in range(10):
        time.sleep(0.01)
        bar.update(1)
    # ~0.01 s per step left: about 10 s, where counting the first step gives ~90 s.
    assert bar.eta_seconds() < 30
    bar.close()
