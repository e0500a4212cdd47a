"""Writes this folder under the oldest supported stack (run with .venv-oldest/bin/python, jax
0.10.2): a one-epoch run of a tiny MBCliqueNet on the bundled digits (config.json and its
checkpoint), both export files of it, 16 test images and the logits the trained network
gives them. tests/test_compatibility.py checks that the current stack restores, predicts and
loads them to the same logits.

    .venv-oldest/bin/python tests/data/jax_0_10_2/make.py
"""

import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

from cliquejax import platform  # noqa: E402

platform.configure_xla()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cliquejax import export, predict  # noqa: E402
from cliquejax.data import sources  # noqa: E402
from cliquejax.train import loop  # noqa: E402
from tests.conftest import tiny_digits_config  # noqa: E402


def main() -> None:
    run = os.path.join(HERE, "run")
    shutil.rmtree(run, ignore_errors=True)
    config = tiny_digits_config(epochs=1)
    config.model.widths, config.model.layers = (8, 8, 16), (2, 2, 2)
    config.data.data_dir = "data/tfds"  # relative, as a user's; built from scikit-learn
    loop.train_and_evaluate(config, run)
    for name in os.listdir(run):  # the run's identity and its checkpoint, nothing else
        if name not in ("config.json", "checkpoints"):
            path = os.path.join(run, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    test = sources.load_source(config.data, "test")
    images = np.stack([test[i]["image"] for i in range(16)])
    _, trainer = export.restore(run)
    trainer.checkpoints.close()
    logits = predict.predictor(trainer)(images)
    for fmt, name in (("clqx", "model.clqx"), ("standalone", "model.clqs")):
        export.export_checkpoint(run, os.path.join(HERE, name), fmt)
    np.save(os.path.join(HERE, "images.npy"), images)
    np.save(os.path.join(HERE, "logits.npy"), np.asarray(logits, np.float32))
    with open(os.path.join(HERE, "stack.json"), "w") as out:
        json.dump({"jax": jax.__version__, "python": sys.version.split()[0]}, out)


if __name__ == "__main__":
    main()
