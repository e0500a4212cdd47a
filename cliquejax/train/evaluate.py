"""`--mode=eval`: the test metrics of the latest good checkpoint in a workdir, with the
run's own config.json (a config given as well must agree with it)."""

from __future__ import annotations

import os

import jax

from cliquejax import report
from cliquejax.train import run_dir


def restore_trainer(config, workdir: str, what: str = "--mode=eval"):
    """A Trainer holding the latest good checkpoint of `workdir`, built from the run's
    config.json (`config`, if not None, must agree with it). Creates nothing on disk;
    one-line errors for a missing run, config or checkpoint."""
    from cliquejax.train.loop import Trainer

    config = run_dir.config_for_run(config, workdir, what)
    trainer = Trainer(config, workdir, create_checkpoints=False)
    if not trainer.restore_latest(move_aside=False):
        raise FileNotFoundError(f"no checkpoint in {trainer.checkpoints.directory}; train first "
                                f"(--mode=train) or point --workdir at a run")
    return trainer


def evaluate_checkpoint(config, workdir: str) -> dict:
    trainer = restore_trainer(config, workdir)
    test = trainer.evaluate()
    results = {"step": int(trainer.state["step"]), "test_accuracy": test["accuracy"],
               "test_loss": test["loss"], "examples": test["examples"],
               "params_fingerprint": trainer.fingerprint()}
    if jax.process_index() == 0:
        report.write_results(os.path.join(workdir, "eval.json"), results)
    trainer.checkpoints.close()
    return results
