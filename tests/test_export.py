"""The deployable file: logits equal the trained network's, size close to the packed bits,
and broken files are refused with clear errors."""

import os

import jax
import numpy as np
import pytest

from cliquejax import export, summary
from cliquejax.train.evaluate import restore_trainer


def test_export_round_trip(trained_digits_run, tmp_path):
    config, workdir, _ = trained_digits_run
    out = str(tmp_path / "model.clqx")
    sizes = export.export_checkpoint(config, workdir, out)
    trainer = restore_trainer(config, workdir)
    images = jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 1))
    expected = trainer.model.apply({"params": trainer.state["params"],
                                    "batch_stats": trainer.state["batch_stats"]}, images,
                                   train=False)
    predict = export.load(out)
    assert np.max(np.abs(np.asarray(predict(images)) - np.asarray(expected))) < 1e-5
    packed = summary.summarize(config)["packed_bytes"]
    assert sizes["payload_bytes"] == packed
    assert os.path.getsize(out) <= 1.05 * packed + sizes["header_bytes"]
    assert sizes["header_bytes"] < 16_384


def test_broken_files_are_refused(trained_digits_run, tmp_path):
    config, workdir, _ = trained_digits_run
    good = tmp_path / "model.clqx"
    export.export_checkpoint(config, workdir, str(good))
    blob = good.read_bytes()
    cases = {"missing.clqx": None, "truncated.clqx": blob[:-10],
             "flipped.clqx": blob[:-1] + bytes([blob[-1] ^ 1]), "junk.clqx": b"not a model"}
    messages = {"missing.clqx": "cannot read", "truncated.clqx": "corrupt",
                "flipped.clqx": "corrupt", "junk.clqx": "not a cliquejax export"}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(export.ExportFileError) as error:
            export.load(str(tmp_path / name))
        assert messages[name] in str(error.value) and "\n" not in str(error.value)
