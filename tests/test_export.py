"""The deployable files: both take uint8 images and give the checkpoint's logits, the
standalone one runs with jax alone and is small, broken files and wrong runs are refused
with one-line errors. One tiny digits run (the session's) is shared by every test."""

import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cliquejax import export, models, names, predict, standalone, summary
from cliquejax.data import info as data_info
from cliquejax.data import sources
from configs import mbclique_cifar10
from tests.conftest import python_without_cliquejax


@pytest.fixture(scope="module")
def digits(trained_digits_run, tmp_path_factory):
    """The run, its test images and labels, the checkpoint's predictor and both files."""
    config, workdir, results = trained_digits_run
    out = tmp_path_factory.mktemp("export")
    test = sources.load_source(config.data, "test")
    images = np.stack([test[i]["image"] for i in range(len(test))])
    labels = np.array([test[i]["label"] for i in range(len(test))])
    _, trainer = export.restore(workdir)
    trainer.checkpoints.close()
    files = {fmt: str(out / f"model.{fmt}") for fmt in export.FORMATS}
    sizes = {fmt: export.export_checkpoint(workdir, path, fmt) for fmt, path in files.items()}
    reference = predict.predictor(trainer)
    return {"config": config, "workdir": workdir, "results": results, "images": images,
            "labels": labels, "predict": reference, "reference": reference(images),
            "files": files, "sizes": sizes}


def _one_line_exit(capsys, main, argv, code=2, warnings=0) -> str:
    """The error line; before it, `warnings` one-line warnings (damaged checkpoints skipped)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    *warned, err = capsys.readouterr().err.splitlines()
    assert len(warned) == warnings and all(w.startswith("warning: ") for w in warned), warned
    assert err.startswith("error: "), err
    return err


def test_clqx_takes_uint8_and_gives_the_checkpoint_logits(digits):
    load = export.load(digits["files"]["clqx"])
    logits = np.asarray(load(digits["images"][..., 0]))  # (N, H, W) grey images too
    assert np.max(np.abs(logits - digits["reference"])) < 1e-5
    sizes = digits["sizes"]["clqx"]
    assert sizes["payload_bytes"] == summary.summarize(digits["config"])["packed_bytes"]
    assert sizes["header_bytes"] < 4096
    with pytest.raises(standalone.StandaloneError, match="uint8"):
        load(digits["images"].astype(np.float32))


def test_standalone_equals_predict_for_any_batch_and_reaches_the_run_accuracy(digits):
    predict_fn = standalone.load(digits["files"]["standalone"])
    assert predict_fn.exported.platforms == ("cpu", "cuda", "tpu")
    assert not isinstance(predict_fn.exported.in_avals[0].shape[0], int)  # symbolic batch
    # the header: the digits' shape and classes (named 0..9, so no separate names)
    assert (predict_fn.image_shape, predict_fn.num_classes) == ((8, 8, 1), 10)
    assert predict_fn.class_names is None
    for batch in (1, 7, 64):
        logits = predict_fn(digits["images"][:batch])
        assert logits.shape == (batch, 10)
        assert np.max(np.abs(logits - digits["reference"][:batch])) < 1e-5
    everything = predict_fn(digits["images"])
    accuracy = float(np.mean(np.argmax(everything, -1) == digits["labels"]))
    assert accuracy == pytest.approx(digits["results"]["final_test_accuracy"], abs=1e-12)


def test_standalone_script_runs_without_cliquejax(digits, tmp_path):
    """The copied script, run in a directory outside the repository by an interpreter that
    has jax and numpy but cannot import cliquejax: its top-1 classes and logits are the
    checkpoint's."""
    script = tmp_path / "standalone.py"
    shutil.copy(standalone.__file__, script)
    shutil.copy(digits["files"]["standalone"], tmp_path / "model.clqs")
    np.savez(tmp_path / "images.npz", images=digits["images"][:7])
    python, env = python_without_cliquejax()
    run = lambda *args: subprocess.run([*python, *args], cwd=tmp_path, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    assert run("-c", "import cliquejax").returncode != 0
    done = run(str(script), "model.clqs", "images.npz", "--logits", "logits.npy")
    assert done.returncode == 0, done.stderr
    top1 = np.argmax(digits["reference"][:7], -1)
    assert done.stdout.splitlines() == [f"{i}\t{c}" for i, c in enumerate(top1)]
    assert np.max(np.abs(np.load(tmp_path / "logits.npy") - digits["reference"][:7])) < 1e-5
    (tmp_path / "cut.clqs").write_bytes((tmp_path / "model.clqs").read_bytes()[:-100])
    broken = run(str(script), "cut.clqs", "images.npz")
    assert broken.returncode == 2 and broken.stdout == ""
    assert broken.stderr.count("\n") == 1 and "truncated or corrupt" in broken.stderr


def test_predict_command_reads_npz_png_and_jpeg(digits, tmp_path, capsys):
    np.savez(tmp_path / "images.npz", images=digits["images"][:5])
    predict.main([f"--workdir={digits['workdir']}", str(tmp_path / "images.npz"),
                  "--logits", str(tmp_path / "logits.npy"), "--top=3"])
    lines = capsys.readouterr().out.splitlines()
    order = np.argsort(-digits["reference"][:5], -1, kind="stable")[:, :3]
    assert lines == [f"{i}\t" + "\t".join(map(str, row)) for i, row in enumerate(order)]
    assert np.max(np.abs(np.load(tmp_path / "logits.npy") - digits["reference"][:5])) < 1e-5
    png, jpeg = str(tmp_path / "digit.png"), str(tmp_path / "digit.jpg")
    Image.fromarray(digits["images"][3, ..., 0]).save(png)
    Image.fromarray(digits["images"][4, ..., 0]).save(jpeg, quality=90)
    predict.main([f"--workdir={digits['workdir']}", png, jpeg, "--logits",
                  str(tmp_path / "files.npy")])
    with Image.open(jpeg) as image:  # lossy: the reference is the decoded pixels
        decoded = np.asarray(image)[None, ..., None]
    expected = digits["predict"](decoded)[0]
    assert capsys.readouterr().out == f"{png}\t{order[3, 0]}\n{jpeg}\t{np.argmax(expected)}\n"
    logits = np.load(tmp_path / "files.npy")
    assert np.max(np.abs(logits - [digits["reference"][3], expected])) < 1e-5
    _one_line_exit(capsys, predict.main, [f"--workdir={digits['workdir']}", "missing.png"])


def test_bad_runs_are_refused_before_anything_is_created(digits, tmp_path, capsys):
    missing = tmp_path / "no-run"
    err = _one_line_exit(capsys, export.main, [f"--workdir={missing}", "--out=x.clqx"])
    assert "does not exist" in err and not missing.exists()
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(os.path.join(digits["workdir"], "config.json"), untrained)
    err = _one_line_exit(capsys, export.main, [f"--workdir={untrained}",
                                               f"--out={tmp_path / 'x.clqs'}"])
    assert "no checkpoint" in err and sorted(os.listdir(untrained)) == ["config.json"]
    _one_line_exit(capsys, predict.main, [f"--workdir={untrained}", "x.npz"])
    damaged = tmp_path / "damaged"
    shutil.copytree(digits["workdir"], damaged)
    for root, _, files in os.walk(damaged / "checkpoints"):
        for name in files:
            if os.sep + "d" == root[-2:]:  # the arrays' data files
                path = os.path.join(root, name)
                os.truncate(path, min(100, os.path.getsize(path)))
    kept = [n for n in os.listdir(damaged / "checkpoints") if n.isdigit()]  # the best and
    # the last ones: which, and so how many, depends on where the run's accuracy peaked
    err = _one_line_exit(capsys, export.main, [f"--workdir={damaged}",
                                               f"--out={tmp_path / 'x.clqs'}"],
                         warnings=len(kept))
    assert "no good checkpoint" in err
    _one_line_exit(capsys, export.main, [f"--workdir={digits['workdir']}", "--out=x",
                                         "--format=onnx"])
    err = _one_line_exit(capsys, export.main, [f"--workdir={digits['workdir']}", "--out=x",
                                               "--config=configs/mbclique_digits.py"])
    assert "config.json" in err
    assert not (tmp_path / "x.clqs").exists()


def test_export_command_prints_only_its_sizes(digits, tmp_path, capfd):
    """One line on stdout; nothing on stderr (no library logging, also from C++)."""
    out = tmp_path / "m.clqs"
    export.main([f"--workdir={digits['workdir']}", f"--out={out}", "--format=standalone"])
    printed, errors = capfd.readouterr()
    assert errors == ""
    assert printed.count("\n") == 1 and printed.startswith(f"wrote {out} (standalone")
    for figure in ("packed weights", "program", "float32 model", str(out.stat().st_size)):
        assert figure in printed


def test_broken_files_are_refused_by_both_loaders(digits, tmp_path):
    loaders = {"clqx": (export.load, export.ExportFileError, "not a cliquejax export"),
               "standalone": (standalone.load, standalone.StandaloneError, "not a standalone")}
    for fmt, (load, error_type, junk_message) in loaders.items():
        blob = open(digits["files"][fmt], "rb").read()
        cases = {"missing": (None, "cannot read"), "truncated": (blob[:-10], "corrupt"),
                 "flipped": (blob[:-1] + bytes([blob[-1] ^ 1]), "corrupt"),
                 "cut-header": (blob[:20], "corrupt"), "junk": (b"not a model", junk_message),
                 "header-flip": (blob[:30] + bytes([blob[30] ^ 4]) + blob[31:], "corrupt")}
        for name, (content, message) in cases.items():
            path = tmp_path / f"{name}.{fmt}"
            if content is not None:
                path.write_bytes(content)
            with pytest.raises(error_type) as error:
                load(str(path))
            assert message in str(error.value) and "\n" not in str(error.value), (fmt, name)


def test_cifar10_standalone_file_is_small():
    """MBCliqueNet CIFAR-10 with random values in place of trained ones (the sizes do not
    depend on the values): under 1/20 of the float32 model, and no more than the packed
    weights + the program + 4 KB."""
    config = mbclique_cifar10.get_config()
    model = models.build_model(config, 10)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, s: rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
        if names.path_string(path).endswith("/var") else
        rng.standard_normal(s.shape).astype(np.float32), shapes)
    info = data_info.DatasetInfo("cifar10", (32, 32, 3), 10, 50_000, 10_000,
                                 (125.3, 123.0, 113.9), (63.0, 62.1, 66.7))
    blob, sizes = export.serialize_standalone(config, variables, info)
    storage = summary.summarize(config)
    assert len(blob) < storage["float32_bytes"] / 20
    assert len(blob) <= storage["packed_bytes"] + sizes["program_bytes"] + 4096
    assert len(blob) <= sizes["bits_bytes"] + sizes["floats_bytes"] + sizes["program_bytes"] \
        + 4096
    assert sizes["bits_bytes"] == sum(
        (leaf.size + 7) // 8 for leaf, is_binary in export._leaves(config, variables, info)
        if is_binary)


def _resigned(blob: bytes, prefix, edit) -> bytes:
    """`blob` with its JSON header edited by `edit` and signed again (a valid CRC-32)."""
    import json
    import zlib

    magic, version, length, _ = prefix.unpack_from(blob)
    header = edit(json.loads(blob[prefix.size:prefix.size + length]))
    text = json.dumps(header).encode()
    return prefix.pack(magic, version, len(text), zlib.crc32(text)) + text + \
        blob[prefix.size + length:]


def test_headers_that_describe_no_network_are_refused(digits, tmp_path):
    """A header whose checksum holds but whose content is wrong (a hand edit, another tool):
    one-line errors from both loaders, not a KeyError or a failure inside JAX."""
    loaders = {"clqx": (export.load, export.ExportFileError, export._PREFIX),
               "standalone": (standalone.load, standalone.StandaloneError,
                              standalone._PREFIX)}
    edits = {"no-shape": lambda h: {k: v for k, v in h.items() if k != "image_shape"},
             "bad-shape": lambda h: dict(h, image_shape=[8, 8, 0]),
             "other-shape": lambda h: dict(h, image_shape=[9, 9, 1]),
             "classes": lambda h: dict(h, num_classes="ten")}
    for fmt, (load, error_type, prefix) in loaders.items():
        blob = open(digits["files"][fmt], "rb").read()
        for name, edit in edits.items():
            if name == "other-shape" and fmt == "clqx":
                continue  # its network is rebuilt for the header's shape, and runs on it
            path = tmp_path / f"{name}.{fmt}"
            path.write_bytes(_resigned(blob, prefix, edit))
            with pytest.raises(error_type) as error:  # the program's shape is 8 x 8
                load(str(path))(np.zeros((2, 9, 9, 1), np.uint8))
            assert "\n" not in str(error.value) and str(path) in str(error.value), (fmt, name)
            if (fmt, name) == ("clqx", "no-shape"):  # the root error's type and first line
                assert "(KeyError: 'image_shape')" in str(error.value)


@pytest.mark.slow  # trains end to end
def test_predict_and_export_apply_the_runs_evaluation_view(tmp_path, capsys):
    """A data.augment=imagenet run evaluates its images resized and centre-cropped on the
    host: predict and the clqx file used to skip that (45 of 120 of a run's own test
    images got another class), and a standalone file cannot do it (refused)."""
    from cliquejax.data import augment, local_sources, pipeline
    from cliquejax.train import evaluate, loop
    from tests.conftest import tiny_digits_config

    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("test", 6)):
        for label, name in enumerate(("a", "b")):
            os.makedirs(tmp_path / "folder" / split / name)
            for index in range(count):  # a bright centre or a bright border, and noise
                pixels = rng.integers(0, 120, (16, 16, 3), dtype=np.uint8)
                pixels[4:12, 4:12] += np.uint8(120 * (label == 0))
                Image.fromarray(pixels).save(tmp_path / "folder" / split / name / f"{index}.png")
    config = tiny_digits_config(epochs=1, batch_size=8, eval_batch_size=8)
    config.data.update(dict(name="image_folder", path=str(tmp_path / "folder"),
                            augment="imagenet", flip=True, crop_padding=0, data_dir=""))
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config, workdir)
    trainer = evaluate.restore_trainer(None, workdir)  # what --mode=eval evaluates
    test = local_sources.ImageFolderSource(str(tmp_path / "folder"), "test")
    logits_file = tmp_path / "logits.npy"
    predict.main([f"--workdir={workdir}", *test.files, f"--logits={logits_file}"])
    capsys.readouterr()
    logits = np.load(logits_file)
    accuracy = np.mean(logits.argmax(-1) == np.asarray(test.labels))
    assert accuracy == trainer.evaluate()["accuracy"]
    # ...and the logits are those of the evaluation pipeline's own images
    batches = pipeline.make_eval_iterator(trainer.config.data, global_batch_size=12,
                                          stats=(trainer.info.mean, trainer.info.std))
    viewed = next(iter(batches))["image"]
    np.testing.assert_array_equal(viewed, augment.eval_images(
        [local_sources.decode_image(path) for path in test.files],
        pipeline.augmentation_from_config(trainer.config.data, trainer.info.image_shape)))
    # one batch of 12 in both: the same arithmetic, but XLA may tile rows differently
    np.testing.assert_allclose(logits, predict.predictor(trainer)(viewed), rtol=1e-5, atol=1e-5)
    trainer.checkpoints.close()
    export.export_checkpoint(workdir, str(tmp_path / "m.clqx"))
    clqx = export.load(str(tmp_path / "m.clqx"))
    native = np.stack([local_sources.decode_image(path) for path in test.files])
    np.testing.assert_allclose(clqx(native), logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"evaluates with data.augment='imagenet' .*; allowed: "
                                         r"--format=clqx"):
        export.export_checkpoint(workdir, str(tmp_path / "m.clqs"), "standalone")
