"""`--mode=eval`: the test metrics of the latest good checkpoint in a workdir, with the
run's own config.json (a config given as well must agree with it)."""

from __future__ import annotations

import os

import jax

from cliquejax import platform, report
from cliquejax.train import run_dir


def restore_trainer(config, workdir: str, what: str = "--mode=eval", *, read_data: bool = True,
                    accept_data_change: bool = False):
    """A Trainer holding the latest good checkpoint of `workdir`, built from the run's
    config.json (`config`, if not None, must agree with it) and data.json (the recorded
    normalisation; the data read now must match its fingerprint unless
    `accept_data_change`; with `read_data=False` the data is not read at all). Creates
    nothing on disk; one-line errors for a missing run, config or checkpoint."""
    from cliquejax.train.loop import Trainer

    config = run_dir.config_for_run(config, workdir, what)
    info, record, changed = run_dir.dataset_for_run(config.data, workdir, fresh=False,
                                                    read_data=read_data,
                                                    accept_change=accept_data_change, what=what)
    trainer = Trainer(config, workdir, create_checkpoints=False, info=info)
    trainer.data_changes = changed
    trainer.data_record = record or run_dir.read_data_record(workdir)
    if not trainer.restore_latest(move_aside=False):
        raise FileNotFoundError(f"no checkpoint in {trainer.checkpoints.directory}; train first "
                                f"(--mode=train) or point --workdir at a run")
    return trainer


def evaluate_checkpoint(config, workdir: str, accept_data_change: bool = False) -> dict:
    trainer = restore_trainer(config, workdir, accept_data_change=accept_data_change)
    platform.announce_runtime()
    test = trainer.evaluate()
    results = {"step": int(trainer.state["step"]), "test_accuracy": test["accuracy"],
               "test_loss": test["loss"], "examples": test["examples"],
               "params_fingerprint": trainer.fingerprint()}
    if trainer.data_changes:  # accepted: the figures are of other data than the run's
        results["data_changed"] = trainer.data_changes
    if jax.process_index() == 0:
        report.write_results(os.path.join(workdir, "eval.json"), results)
    trainer.checkpoints.close()
    return results
