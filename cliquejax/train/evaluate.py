"""`--mode=eval`: the test metrics of the latest checkpoint in a workdir."""

from __future__ import annotations

import os

import jax

from cliquejax import report


def restore_trainer(config, workdir: str):
    """A Trainer holding the latest checkpoint of `workdir` (error if there is none)."""
    from cliquejax.train.loop import Trainer

    trainer = Trainer(config, workdir)
    if not trainer.restore_latest():
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
