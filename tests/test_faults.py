"""Bad inputs a user can give, each stopped with one line: through the command line
(launch.py, cliquejax.summary, cliquejax.lower) for config files, npz files, image folders
and TFDS files; in process for the rules behind them (config differences, the workdir lock,
class counts, image sizes, the progress bar's ETA)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from cliquejax import report
from cliquejax.cli import shipped_configs
from cliquejax.data import local_sources
from cliquejax.train import loop, run_dir
from tests.conftest import DATA_DIR, ROOT, host_devices, tiny_digits_config

SMALL = ["--config=configs/mbclique_digits.py", "--config.model.widths=16,16,32",
         "--config.model.layers=2,2,2", "--config.train.epochs=1",
         "--config.train.batch_size=16", "--config.train.max_steps=2"]


def run(*args, module=None):
    command = [sys.executable, *(["-m", module] if module else ["launch.py"]), *args]
    env = dict(os.environ, XLA_FLAGS=host_devices(1))
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


@pytest.mark.slow  # starts a process
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
                "with get_config(), or a shipped config's name (" + ", ".join(shipped_configs())
                + ")")
    assert one_line(run(f"--config={path}", f"--workdir={tmp_path / 'run'}")) == expected
    assert not os.path.exists(tmp_path / "run")
    if case != "syntax":
        for module in ("cliquejax.summary", "cliquejax.lower"):
            assert one_line(run(f"--config={path}", module=module)) == expected, module


@pytest.mark.slow  # starts a process
def test_a_config_given_by_path_loads_from_any_directory(tmp_path):
    """Config files import their siblings (`from configs import ...`): given by path, they
    load with the working directory elsewhere; and summary prints no library logging."""
    config = os.path.join(ROOT, "configs", "mbclique_digits.py")
    done = subprocess.run([sys.executable, "-m", "cliquejax.summary", f"--config={config}",
                           "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
    assert json.loads(done.stdout)["classes"] == 10


@pytest.mark.slow  # starts a process
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


@pytest.mark.slow  # starts a process
def test_train_without_config_needs_a_run_to_resume(tmp_path):
    expected = (f"error: --config is required to start a run in {tmp_path} (it holds no "
                "config.json to resume); allowed: --config=<a config's name or file>")
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


def test_a_run_written_before_a_field_existed_resumes_with_its_default(tmp_path):
    """A config.json without `model.compression` (a model field: the module's default) or
    `optimizer.clip_latent` (the table `BEFORE_THE_FIELD`) is the run today's config makes
    when that config keeps the old value; a config that changes it is refused, naming the
    value the run had."""
    config = tiny_digits_config()
    old = json.loads(config.to_json())
    del old["model"]["compression"], old["optimizer"]["clip_latent"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    os.makedirs(tmp_path / "checkpoints" / "4")  # a run that trained: its config binds
    config.model.compression, config.optimizer.clip_latent = False, False
    assert run_dir.check_resume(config, str(tmp_path), overwrite=False) == {}
    config.model.compression = True
    with pytest.raises(run_dir.ConfigMismatchError,
                       match=re.escape("(model.compression: False -> True)")):
        run_dir.check_resume(config, str(tmp_path), overwrite=False)


def test_absent_model_fields_take_the_values_older_runs_had():
    """The module defaults are the networks before each field existed (a default that
    changed would silently change every older run's meaning on resume and in reproduce)."""
    before = {"model.bn_momentum": 0.999, "model.bn_epsilon": 0.001,
              "model.bn_running_var": "biased", "model.clique_conv": "bottleneck",
              "model.stage_two_kernels": "shared", "model.transition_kernel": 1,
              "model.transition_width": "next", "model.attention": False,
              "model.head_input": "x0_and_stage2", "model.variant": "II+II", "model.x": 0,
              "model.compression": False}
    assert {field: run_dir.absent_value({"model.name": "mbcliquenet"}, field)
            for field in before} == before
    assert run_dir.absent_value({"model.name": "cliquenet"}, "model.head_input") == \
        run_dir.ABSENT  # not a field of CliqueNet: no default to take
    assert run_dir.absent_value({}, "data.augment") == "cifar"


def test_remat_auto_compares_as_the_policy_it_resolves_to():
    """A run written with train.remat=layer on a CPU (before `auto` existed) is the run
    today's config file (`auto`) makes here; another policy is still a change."""
    from cliquejax import kernels

    here = kernels.remat("auto")
    assert run_dir.config_differences({"train": {"remat": here}},
                                      {"train": {"remat": "auto"}}) == ([], {})
    other = "block" if here != "block" else "none"
    refused, _ = run_dir.config_differences({"train": {"remat": other}},
                                            {"train": {"remat": "auto"}})
    assert refused == [f"train.remat: {other!r} -> {here!r}"]


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


@pytest.mark.slow  # starts a process
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


def test_one_class_huge_labels_and_fields_a_source_ignores_are_refused(tmp_path):
    """One class used to train a 1-way classifier reporting 100.00%; a label of 10**10
    built a list of every class number before naming the gap; data.num_train for the
    digits trained on all 1,437 of them."""
    from cliquejax.data import sources

    path = str(labelled_npz(tmp_path / "one.npz", [0] * 8, [0, 0]))
    with pytest.raises(ValueError, match=re.escape(f"npz file {path}: y_train holds one class "
                                                   "(every label is 0); allowed: labels of two")):
        local_sources.NpzSource(path, "train")
    path = str(labelled_npz(tmp_path / "huge.npz", np.array([0, 1, 10**10]), [0, 1]))
    with pytest.raises(ValueError, match=re.escape(
            "no image of class 2 (its largest label is 10000000000; 3 classes occur)")):
        local_sources.NpzSource(path, "train")
    folder = tmp_path / "folder"
    image_folder(folder, classes=("all",))
    with pytest.raises(ValueError, match=re.escape(
            f"image folder {folder}/train has one class folder (all); allowed: two or more")):
        local_sources.ImageFolderSource(str(folder), "train")
    config = tiny_digits_config()
    for field, value, expected in [
            ("num_classes", 1, "data.num_classes=1; allowed: 0 (the data set's classes) or the "
                               "number of classes, two or more"),
            ("num_train", 100, "data.num_train=100 is read with data.name=synthetic only, not "
                               "with data.name='digits' (which would ignore it); allowed: "
                               "data.num_train=0 with 'digits'"),
            ("svhn_extra", True, "data.svhn_extra=True is read with data.name=svhn_cropped "
                                 "only")]:
        changed = json.loads(config.data.to_json())
        changed[field] = value
        with pytest.raises(ValueError, match=re.escape(expected)):
            sources.load_source(type(config.data)(changed), "train")
    npz = dict(json.loads(config.data.to_json()), name="npz", path=str(tmp_path / "x.npz"))
    with pytest.raises(ValueError, match=re.escape(
            f"data.data_dir={DATA_DIR!r} is read with TFDS data sets (and digits) only, not "
            "with data.name='npz' (which reads data.path); allowed: data.data_dir=''")):
        sources.load_source(type(config.data)(npz), "train")


@pytest.mark.parametrize("given, first", [
    (["--config.train.batch_size=0", "--config.train.epochs=0"], "train.batch_size=0 "),
    (["--config.optimizer.lr=-1.0", "--config.model.widths=0"], "optimizer.lr=-1.0;"),
    (["--config.model.widths=16,0,32", "--config.train.epochs=0"], "model.widths=16,0,32 "),
    (["--config.data.num_classes=1", "--config.optimizer.lr=-1.0"], "data.num_classes=1;"),
    (["--config.model.K=0", "--config.data.num_train=100"], "model.K=0")])
def test_two_errors_at_once_name_the_first_as_given(given, first):
    """The code's order (train before optimizer before model) used to decide which."""
    from cliquejax.train import preflight
    from tests.conftest import launch_config

    config = launch_config(["x", "--config=configs/mbclique_digits.py", *given])
    with pytest.raises(ValueError, match=re.escape(first)):
        preflight.check_fields_in_given_order(config, given)
    with pytest.raises(ValueError, match=re.escape(given[1].removeprefix("--config."))):
        preflight.check_fields_in_given_order(config, given[::-1])


@pytest.mark.parametrize("field, value, allowed", [
    ("lr", float("nan"), "a finite rate > 0"), ("lr", float("inf"), "a finite rate > 0"),
    ("weight_decay", float("inf"), "a finite decay >= 0"),
    ("momentum", 1.0, "0 <= momentum < 1")])
def test_optimizer_values_that_cannot_train_are_refused(field, value, allowed):
    """An infinite rate or decay passed the checks (inf > 0) and failed at the first step."""
    from cliquejax.train import optim

    config = tiny_digits_config()
    config.optimizer[field] = value
    with pytest.raises(ValueError, match=re.escape(
            f"optimizer.{field}={value!r}; allowed: {allowed}")):
        optim._validate_optimizer(config.optimizer)


def test_a_file_that_is_no_npz_and_an_empty_path_are_named(tmp_path):
    """A text file was answered with numpy's advice to unpickle it (allow_pickle=True: an
    unsafe action), an empty data.path as the working directory."""
    from cliquejax.data import sources

    text = tmp_path / "notes.npz"
    text.write_text("hello")
    with pytest.raises(ValueError, match=re.escape(
            f"npz file {text} is not an npz archive (it does not start as a zip file does); "
            "allowed: a file written by numpy.savez with keys x_train, y_train, x_test, y_test")):
        local_sources.NpzSource(str(text), "train")
    config = tiny_digits_config()
    for name, what in (("npz", "npz file"), ("image_folder", "image folder")):
        config.data.name, config.data.path = name, ""
        with pytest.raises(ValueError, match=re.escape(
                f"data.path='' is empty; allowed: the {what} that data.name={name!r} reads")):
            sources.load_source(config.data, "train")
    from cliquejax import standalone

    with pytest.raises(standalone.StandaloneError, match=re.escape(  # it wrote no file
            "--logits='' is empty; allowed: a file path in an existing directory, or no")):
        standalone.check_output("")


@pytest.mark.parametrize("text", ["[1, 2]", '{"seed": 0}'])
def test_a_run_file_that_is_json_but_no_config_is_named(text, tmp_path):
    (tmp_path / "config.json").write_text(text)
    kind = "a JSON list" if text.startswith("[") else "an object"
    expected = re.escape(f"{tmp_path}/config.json is not a run's config ({kind} without the "
                         "groups model, data, train); allowed: the config.json that launch.py "
                         "wrote")
    for read in (run_dir.load_config, run_dir.read_config_json):
        with pytest.raises(run_dir.ConfigMismatchError, match=expected):
            read(str(tmp_path))


def test_images_too_small_for_the_network_are_refused(tmp_path):
    config = tiny_digits_config()
    config.data.name, config.data.data_dir = "npz", ""
    config.data.path = str(labelled_npz(tmp_path / "tiny.npz", np.arange(64) % 10,
                                        np.arange(10), size=2))
    with pytest.raises(ValueError, match=r"images of 2x2 are too small for model mbcliquenet"):
        loop.Trainer(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_eta_does_not_count_the_first_step(capsys):
    bar = report.ProgressBar(1000)
    now = [bar._bar._time()]  # tqdm's clock, advanced by hand: no sleep a loaded machine
    bar._bar._time = lambda: now[0]  # stretches
    now[0] += 1.0  # the first step compiles
    bar.update(1)
    for _ in range(10):
        now[0] += 0.01
        bar.update(1)
    # 0.01 s per step for 989 steps left, where counting the first step gives ~90 s.
    assert bar.eta_seconds() == pytest.approx(9.89)
    bar.close()


# --- issue 27: the data is part of the run; every check before the first write; images as
# they are; run directories; every command's malformed input (command line, as users run it)

NPZ_RUN = ["--config=configs/mbclique_digits.py", "--config.model.widths=16,16,32",
           "--config.model.layers=2,2,2", "--config.train.epochs=1",
           "--config.train.batch_size=16", "--config.train.eval_batch_size=16",
           "--config.train.max_steps=2", "--config.data.name=npz"]


def run_env(*args, module=None, env=None, cwd=ROOT):
    command = [sys.executable, *(["-m", module] if module else ["launch.py"]), *args]
    env = {**os.environ, "XLA_FLAGS": host_devices(1), **(env or {})}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def grey_png(path, value, dtype=np.uint8, size=8):
    Image.fromarray(np.full((size, size), value, dtype)).save(path)
    return str(path)


@pytest.mark.slow
def test_the_data_is_part_of_the_run(tmp_path):
    """data.json records what was read and its normalisation: after the npz changes, eval and
    resume stop naming the change (eval runs with --accept_data_change, saying so), and
    predict gives the same logits as before, from the recorded statistics (it used to
    measure them again on the new data). A start that failed (config.json, no checkpoint)
    does not block the corrected command; `~` in --workdir is the home directory, printed as
    written; 16-bit PNGs keep their range; the same bytes at another path are the same
    data."""
    data = tmp_path / "data.npz"
    labelled_npz(data, np.arange(64) % 4, np.arange(16) % 4)
    workdir = tmp_path / "run"
    os.makedirs(workdir)
    stale = json.loads(json.dumps(local_config_json()))
    stale["optimizer"]["name"] = "lbfgs"  # what a failed start of an earlier version left
    (workdir / "config.json").write_text(json.dumps(stale))
    done = run_env(*NPZ_RUN, f"--config.data.path={data}", "--workdir=~/run",
                   env={"HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"results: {workdir}/results.json" in done.stderr
    record = json.loads((workdir / "data.json").read_text())
    assert record["fingerprint"]["train"]["file"] == str(data)
    assert record["dataset"]["num_train"] == 64 and len(record["dataset"]["mean"]) == 1
    images = tmp_path / "images.npz"
    rng = np.random.default_rng(1)
    np.savez(images, images=rng.integers(0, 256, (3, 8, 8), dtype=np.uint8))
    pngs = [grey_png(tmp_path / "eight.png", 128), grey_png(tmp_path / "sixteen.png", 128 * 257,
                                                            np.uint16)]
    before = tmp_path / "before.npy"
    assert run_env(f"--workdir={workdir}", str(images), f"--logits={before}",
                   module="cliquejax.predict").returncode == 0
    pixels = tmp_path / "pixels.npy"
    assert run_env(f"--workdir={workdir}", *pngs, f"--logits={pixels}",
                   module="cliquejax.predict").returncode == 0
    # 128 * 257 of 65535 is 128 of 255: the decoded pixels are the same integers...
    np.testing.assert_array_equal(*(local_sources.decode_image(str(png), 1) for png in pngs))
    # ...but the two logits are rows 0 and 1 of one batch, which XLA:CPU may vectorise
    # differently (7e-7 apart on an AVX2-only EPYC, equal with AVX-512): same pixels, not
    # the same arithmetic, so a float tolerance.
    eight, sixteen = np.load(pixels)
    np.testing.assert_allclose(eight, sixteen, rtol=1e-5, atol=1e-5)
    bomb = tmp_path / "bomb.png"  # a header claiming 20000 x 20000 pixels
    chunk = lambda kind, body: (len(body).to_bytes(4, "big") + kind + body  # noqa: E731
                                + zlib.crc32(kind + body).to_bytes(4, "big"))
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", (20_000).to_bytes(4, "big") * 2
                                                  + bytes([8, 0, 0, 0, 0])) + chunk(b"IEND", b""))
    assert one_line(run_env(f"--workdir={workdir}", str(bomb), module="cliquejax.predict")) == (
        f"error: image file {bomb} has more pixels than PIL's limit of 89,478,485; allowed: "
        "smaller images (resize it beforehand)")

    # the same bytes at another path are the same data (a path was refused as a change)
    moved = tmp_path / "moved.npz"
    shutil.copy(data, moved)
    done = run_env(*NPZ_RUN, f"--config.data.path={moved}", f"--workdir={workdir}",
                   "--mode=eval")
    assert done.returncode == 0, done.stderr[-3000:]
    arrays = dict(np.load(data))
    np.savez(data, **dict(arrays, x_train=arrays["x_train"] // 2, x_test=arrays["x_test"] // 2))
    changed = one_line(run_env(f"--workdir={workdir}", "--mode=eval"))
    assert changed.startswith(f"error: the data of the run in {workdir} changed since it was "
                              "recorded in data.json (test.sha256: "), changed
    assert changed.endswith("--mode=eval would use other data than the run's: restore the data "
                            "the run was trained on, or add --accept_data_change to use it as "
                            "it is now (normalised as the run was; the change is recorded)")
    resume = one_line(run_env(f"--workdir={workdir}"))
    assert "resuming would use other data than the run's" in resume
    accepted = run_env(f"--workdir={workdir}", "--mode=eval", "--accept_data_change")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert json.loads(accepted.stdout)["data_changed"][0].startswith("test.sha256: ")
    after = tmp_path / "after.npy"
    assert run_env(f"--workdir={workdir}", str(images), f"--logits={after}",
                   module="cliquejax.predict").returncode == 0
    np.testing.assert_array_equal(np.load(before), np.load(after))


def local_config_json() -> dict:
    from tests.conftest import launch_config

    return json.loads(launch_config(["x", *NPZ_RUN]).to_json_best_effort())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["optimizer", "seed", "eval_batch"])
def test_every_check_runs_before_anything_is_written(case, tmp_path):
    """Values that used to pass the checks, write config.json and fail at the first step (or
    after the first epoch, for the evaluation batch) stop first, leaving nothing behind."""
    data = labelled_npz(tmp_path / "data.npz", np.arange(64) % 4, np.arange(16) % 4)
    override, expected, devices = {
        "optimizer": ("--config.optimizer.name=lbfgs", "error: the train step cannot be built "
                      "for this config (optimizer 'lbfgs', schedule 'sgdr'): ", 1),
        "seed": ("--config.seed=-1", "error: seed=-1; allowed: an integer 0..", 1),
        "eval_batch": ("--config.train.eval_batch_size=15", "error: train.eval_batch_size=15 "
                       "is not divisible by the 2 devices; allowed: a multiple of 2", 2),
    }[case]
    workdir = tmp_path / "run"
    done = run_env(*NPZ_RUN, f"--config.data.path={data}", override, f"--workdir={workdir}",
                   env={"XLA_FLAGS": host_devices(devices)})
    assert one_line(done).startswith(expected), one_line(done)
    assert not os.path.exists(workdir)


@pytest.mark.slow
def test_jax_environment_the_project_cannot_honour_is_named(tmp_path):
    """They used to give errors blaming the config, or a traceback, and leave an empty run
    directory."""
    workdir = tmp_path / "run"
    for env, expected in [
            ({"JAX_ENABLE_X64": "1"}, "error: JAX_ENABLE_X64=1 is set; allowed: unset it"),
            ({"JAX_PLATFORMS": "cuda"}, "error: JAX_PLATFORMS=cuda cannot be used on this "
                                        "machine (")]:
        message = one_line(run_env(*SMALL, f"--workdir={workdir}", env=env))
        assert message.startswith(expected), message
        assert not os.path.exists(workdir)


@pytest.mark.slow
def test_overwrite_moves_aside_only_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    done = run_env(*SMALL, f"--workdir={tmp_path}", "--overwrite")
    assert one_line(done) == (f"error: --overwrite: {tmp_path} holds no run (no config.json or "
                              "checkpoints/) but other files (notes.txt); allowed: --overwrite "
                              "on a run directory; choose a new or empty --workdir")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def image_folder(root, classes=("a", "b"), per_class=2):
    for split in ("train", "test"):
        for name in classes:
            os.makedirs(root / split / name, exist_ok=True)
            for index in range(per_class):
                Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(
                    root / split / name / f"{index}.png")
    return root


def test_an_image_folder_is_identified_by_its_content(tmp_path):
    """The same files copied to another path (new modification times) are the same data; a
    file rewritten with other bytes of the same size is a change, named by its class; a
    record from before content hashing compares by file and byte counts."""
    folder = image_folder(tmp_path / "folder")
    record = {split: local_sources.ImageFolderSource(str(folder), split).fingerprint()
              for split in ("train", "test")}
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, copy_function=shutil.copyfile)  # times not kept
    os.utime(copy / "train" / "a" / "0.png", ns=(1, 1))
    moved = {split: local_sources.ImageFolderSource(str(copy), split).fingerprint()
             for split in ("train", "test")}
    assert run_dir.data_differences(record, moved) == []
    image = copy / "train" / "b" / "1.png"
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF  # inside the IEND-preceding chunk: the size is unchanged
    image.write_bytes(bytes(data))
    changed = {split: local_sources.ImageFolderSource(str(copy), split).fingerprint()
               for split in ("train", "test")}
    assert [entry.split(":")[0] for entry in run_dir.data_differences(record, changed)] == [
        "train.content.b"]
    legacy = json.loads(json.dumps(record))
    for split in legacy:
        legacy[split]["classes"] = legacy[split].pop("content")
    assert run_dir.data_differences(legacy, moved) == []  # an older run still resumes


@pytest.mark.slow
@pytest.mark.parametrize("case", ["not_an_image", "empty_class", "class_count", "pickled_npz",
                                  "damaged_test_image"])
def test_data_that_is_not_what_it_seems_is_named(case, tmp_path):
    """What used to be dropped or trained without a word: a file that is no image (with
    hidden entries around, which are ignored), a class without training images, a folder
    whose class count is not the config's (Tiny ImageNet's 100), labels stored as Python
    objects (named as such, not as a damaged file); and a test image whose pixels are
    damaged, which used to stop the run at its first evaluation, after an epoch."""
    folder = image_folder(tmp_path / "folder", per_class=8)  # one batch of 16
    (folder / "train" / ".DS_Store").write_text("finder")
    os.makedirs(folder / "train" / ".ipynb_checkpoints")
    (folder / "train" / "a" / "._0.png").write_text("apple double")
    overrides = ["--config.data.name=image_folder", f"--config.data.path={folder}"]
    if case == "not_an_image":
        (folder / "train" / "a" / "a_boxes.txt").write_text("0 0 8 8")
        expected = (f"error: {folder}/train/a/a_boxes.txt is not a .png/.jpg/.jpeg image; "
                    "allowed: only images in class folders (remove or move the file; hidden "
                    "files are ignored)")
    elif case == "empty_class":
        os.makedirs(folder / "train" / "c")
        expected = (f"error: class folder {folder}/train/c holds no images; allowed: at least "
                    "one png/jpg image in every training class")
    elif case == "damaged_test_image":  # its header reads, its pixels do not
        damaged = folder / "test" / "b" / "1.png"
        noise = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(noise).save(damaged)
        whole = damaged.read_bytes()
        damaged.write_bytes(whole[:len(whole) // 2])  # the header and half the pixels
        expected = f"error: image file {damaged} cannot be read ("
    elif case == "class_count":
        overrides = ["--config=configs/mbclique_tinyimagenet.py", f"--config.data.path={folder}"]
        expected = (f"error: image folder {folder}/train has 2 class folders; the config "
                    "expects data.num_classes=100; allowed: a folder of 100 classes, or "
                    "--config.data.num_classes=2")
    else:
        path = tmp_path / "labels.npz"
        np.savez(path, x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.array(["a"] * 4, object),
                 x_test=np.zeros((2, 8, 8), np.uint8), y_test=np.zeros(2, np.int64))
        overrides = ["--config.data.name=npz", f"--config.data.path={path}"]
        expected = (f"error: npz file {path}: key 'y_train' holds Python objects (numpy stored "
                    "it pickled); allowed: numeric arrays, uint8 images and integer labels")
    args = SMALL if case != "class_count" else []
    workdir = tmp_path / "run"
    message = one_line(run_env(*args, *overrides, f"--workdir={workdir}"))
    assert message == expected or (expected.endswith("(") and message.startswith(expected))
    assert not os.path.exists(workdir)


def test_image_folder_modes_keep_their_range_and_hidden_entries_are_ignored(tmp_path):
    folder = image_folder(tmp_path)
    (folder / "train" / ".DS_Store").write_text("finder")
    (folder / "train" / "a" / "._0.png").write_text("apple double")
    grey_png(folder / "train" / "a" / "0.png", 40_000, np.uint16)  # I;16 -> 156 of 255
    Image.new("1", (8, 8), 1).save(folder / "train" / "a" / "1.png")  # 1-bit: 255
    Image.new("P", (8, 8), 3).save(folder / "train" / "b" / "0.png")  # palette index 3
    source = local_sources.ImageFolderSource(str(folder), "train")
    assert source.class_names == ["a", "b"] and len(source) == 4
    assert source[0]["image"].shape == (8, 8, 3)
    assert {int(source[0]["image"].max()), int(source[0]["image"].min())} == {156}
    assert int(source[1]["image"].min()) == 255
    palette = Image.new("P", (1, 1), 3).convert("RGB").getpixel((0, 0))
    assert tuple(source[2]["image"][0, 0]) == palette


@pytest.mark.slow
def test_malformed_inputs_of_every_command_are_one_line(tmp_path):
    """summary with a config argument its file ignores and a repeated list override;
    standalone.py with a .npy instead of an .npz and with object arrays; predict with an
    image over PIL's pixel limit (in `test_the_data_is_part_of_the_run`, which has a run)."""
    config = "--config=configs/mbclique_digits.py"
    assert one_line(run_env(f"{config}:foo", module="cliquejax.summary")) == (
        "error: --config=configs/mbclique_digits.py:foo: mbclique_digits.py takes no argument "
        "('foo' changes nothing); allowed: --config=configs/mbclique_digits.py without ':foo'")
    assert one_line(run_env(config, "--config.model.widths=16,16,32", "--config.model.widths=32",
                            module="cliquejax.summary")) == (
        "error: --config.model.widths is given more than once; allowed: each list field once "
        "(repeated, the lists are joined: --config.model.widths=16,16,32,32)")
    # the one bad override of several is named, not every override given
    assert one_line(run_env(config, "--config.model.K=4", "--config.train.epoch=3",
                            module="cliquejax.summary")).startswith(
        "error: bad config override --config.train.epoch=3: 'epoch' Did you mean \"epochs\"")
    # a bad command-line flag: absl's two lines (FATAL ..., Pass --helpshort ...), exit 1
    assert one_line(run_env(f"--workdir={tmp_path / 'w'}", "--mode=bogus")) == (
        "error: flag --mode=bogus: value should be one of <train|eval>; allowed: the flags "
        "--helpshort lists")
    assert one_line(run_env(config, "--nosuchflag", module="cliquejax.summary")) == (
        "error: Unknown command line flag 'nosuchflag'; allowed: the flags --helpshort lists")
    # words that are no flag used to be ignored: a field without its --, an unquoted space
    assert one_line(run_env(config, "config.train.epochs=3", module="cliquejax.summary")) == (
        "error: 'config.train.epochs=3' is not a flag; allowed: --config.train.epochs=3")
    assert one_line(run_env(*SMALL, f"--workdir={tmp_path}/my", "run")) == (
        f"error: 'run' is not a flag (it follows --workdir={tmp_path}/my: a value with spaces "
        "must be quoted); allowed: flags only, each --name=value (quoted where the value has "
        "spaces)")
    assert not os.path.exists(tmp_path / "my")
    npy, objects = tmp_path / "images.npy", tmp_path / "objects.npz"
    np.save(npy, np.zeros((2, 8, 8), np.uint8))
    np.savez(objects, images=np.array([np.zeros((8, 8), np.uint8), None], object))
    model = tmp_path / "model.clqs"
    model.write_bytes(b"not a model")
    standalone_py = os.path.join(ROOT, "cliquejax", "standalone.py")
    for images, expected in [
            (npy, f"error: '{npy}' is a .npy array, not an .npz archive; allowed: an .npz with "
                  "images=uint8 N x H x W [x C] (numpy.savez(path, images=...))"),
            (objects, f"error: '{objects}': its 'images' array holds Python objects; allowed: "
                      "an .npz with images=uint8 N x H x W [x C]")]:
        done = subprocess.run([sys.executable, standalone_py, str(model), str(images)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert one_line(done) == expected


def mapped_files(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return maps.read()
    except OSError:  # it has just ended
        return ""


@pytest.mark.slow
@pytest.mark.parametrize("command", ["launch", "launch_pending", "predict"])
def test_ctrl_c_while_starting_is_one_line(command, tmp_path):
    """SIGINT soon after the start (importing JAX, parsing flags): exit 130, one line. And a
    SIGINT that arrived while it was held back (as launch.py and the huge-pages restart hold
    it until the handler is installed) lands as the same line, not a traceback or nothing."""
    args = ([sys.executable, "launch.py", *SMALL, f"--workdir={tmp_path / 'run'}"]
            if command.startswith("launch") else
            [sys.executable, "-m", "cliquejax.predict", f"--workdir={tmp_path}", "x.npz"])
    held = command == "launch_pending"
    # the child inherits this thread's signal mask (no preexec_fn: a fork of JAX's threads)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT} if held else set())
    try:
        process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    # The signal that it is starting: jaxlib mapped into the process (the heavy imports, after
    # launch's huge-pages restart), however slow a loaded machine makes it get there.
    # Held back: sent at once, pending from the process's first instruction on.
    while not held and process.poll() is None and "jaxlib" not in mapped_files(process.pid):
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert process.returncode == 130 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: interrupted (Ctrl-C)")
    assert not os.path.exists(tmp_path / "run")
