"""What the oldest supported stack (Python 3.11, jax 0.10.2) wrote, the current stack reads:
a run's checkpoint restores and predicts, and both export files load, to the logits the old
stack computed (tests/data/jax_0_10_2/make.py made them)."""

import json
import os
import shutil

import numpy as np
import pytest

from cliquejax import export, predict, standalone
from tests.conftest import ROOT

OLD = os.path.join(ROOT, "tests", "data", "jax_0_10_2")
# The same weights through another XLA release: the convolutions may sum in another order,
# so float32 rounding differs, relative to the logits' size (up to ~80 here).
ATOL = 1e-6 * 80 * 4


@pytest.fixture(scope="module")
def written():
    with open(os.path.join(OLD, "stack.json")) as f:
        assert json.load(f)["jax"] == "0.10.2"
    return np.load(os.path.join(OLD, "images.npy")), np.load(os.path.join(OLD, "logits.npy"))


def test_an_old_checkpoint_restores_and_predicts_the_same_logits(written, tmp_path,
                                                                 monkeypatch):
    images, logits = written
    monkeypatch.chdir(ROOT)  # the run's config.json names its data as a user would, relative
    run = tmp_path / "run"
    shutil.copytree(os.path.join(OLD, "run"), run)
    _, trainer = export.restore(str(run))
    try:
        np.testing.assert_allclose(predict.predictor(trainer)(images), logits, atol=ATOL)
    finally:
        trainer.checkpoints.close()


def test_old_export_files_load_to_the_same_logits(written):
    images, logits = written
    np.testing.assert_allclose(export.load(os.path.join(OLD, "model.clqx"))(images), logits,
                               atol=ATOL)
    np.testing.assert_allclose(standalone.load(os.path.join(OLD, "model.clqs"))(images),
                               logits, atol=ATOL)
