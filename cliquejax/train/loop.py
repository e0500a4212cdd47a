"""The training loop: epochs, evaluation, checkpoints, metrics, signals. It owns every side
effect; the jitted steps (`step.py`) stay pure."""

from __future__ import annotations

import os
import signal
import time

import jax
import numpy as np

from cliquejax import bits, checkpoint, data, models, report
from cliquejax.models.common import check_range
from cliquejax.train import optim, run_dir, step

SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class NonFiniteError(RuntimeError):
    pass


class Preempted(Exception):  # noqa: N818 - a stop, not an error
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class SignalFlag:
    """Records SIGTERM / SIGINT so the loop can finish the step and save a checkpoint."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for sig in SIGNAL_EXIT_CODES:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def any_process(self) -> bool:
        """True on every process when any process received a signal."""
        mine = np.array([self.received is not None], np.int32)
        if jax.process_count() == 1:
            return bool(mine[0])
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(mine)))


def validate_train(train) -> None:
    for field in ("epochs", "batch_size", "eval_batch_size", "log_every_steps",
                  "eval_every_epochs", "checkpoint_every_epochs", "keep_checkpoints"):
        check_range(f"train.{field}", train[field], 1)


def build_model_and_transforms(config, image_shape, num_classes: int, steps_per_epoch: int):
    """(model, optimizer transforms, lr schedule, binary mask or None) of a run: what
    `Trainer` trains and `cliquejax.lower` lowers. The mask marks the weights the model's
    layers store in 1 bit (`cliquejax.bits`); None for a model without binary layers."""
    model = models.build_model(config, num_classes)
    tx, schedule = optim.make_optimizer(config, steps_per_epoch)
    variables = bits.abstract_variables(model, image_shape)
    binary = bits.binary_mask(variables) if bits.has_quantized_layers(variables) else None
    return model, step.make_transforms(config, tx, variables["params"]), schedule, binary


class Trainer:
    """Everything a run needs, built once from the config."""

    def __init__(self, config, workdir: str):
        validate_train(config.train)
        self.config, self.workdir = config, workdir
        self.is_main = jax.process_index() == 0
        self.info = data.dataset_info(config.data)
        self.global_batch = config.train.batch_size
        self.steps_per_epoch = data.steps_per_epoch(self.info, self.global_batch)
        self.total_steps = config.train.epochs * self.steps_per_epoch
        if config.train.max_steps > 0:
            self.total_steps = min(self.total_steps, config.train.max_steps)
        self.model, self.transforms, self.schedule, binary_mask = build_model_and_transforms(
            config, self.info.image_shape, self.info.num_classes, self.steps_per_epoch)
        self.shardings = step.make_shardings(self.global_batch)
        self.state = step.initial_state(self.model, self.transforms, self.info.image_shape,
                                        config.seed, self.shardings.replicated)
        self.train_step, self.eval_step = step.jit_steps(
            self.model, self.transforms, self.schedule, config, self.shardings, self.state,
            binary_mask)
        self.checkpoints = checkpoint.Checkpointer(
            os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
        self.meta = {"best_accuracy": -1.0, "best_loss": None, "epoch": 0}

    def restore_latest(self) -> bool:
        if self.checkpoints.latest_step() is None:
            return False
        self.state, meta = self.checkpoints.restore(self.state)
        self.meta.update(meta)
        return True

    def evaluate(self) -> dict:
        totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        batches = data.make_eval_iterator(self.config.data,
                                          global_batch_size=self.config.train.eval_batch_size)
        for local in batches:
            sums = self.eval_step(self.state, step.global_batch(local, self.eval_shardings))
            for key, value in jax.device_get(sums).items():
                totals[key] += float(value)
        count = max(totals["count"], 1.0)
        return {"loss": totals["loss"] / count, "accuracy": totals["correct"] / count,
                "examples": int(totals["count"])}

    @property
    def eval_shardings(self):
        return step.make_shardings(self.config.train.eval_batch_size)

    def save(self, epoch: int, accuracy: float) -> None:
        meta = dict(self.meta, epoch=epoch, step=int(self.state["step"]), accuracy=accuracy)
        self.checkpoints.save(int(self.state["step"]), self.state, meta, force=True)

    def fingerprint(self) -> str:
        return checkpoint.params_fingerprint(
            {"params": self.state["params"], "batch_stats": self.state["batch_stats"]})


def _mean_metrics(history: list[dict]) -> dict:
    fetched = jax.device_get(history)
    return {key: float(np.mean([m[key] for m in fetched])) for key in fetched[0]}


def _check_finite(pending, first_step: int, trainer: Trainer) -> None:
    if pending is not None and float(pending["finite"]) == 0.0:
        last = trainer.checkpoints.latest_step()
        kept = f"the last good checkpoint (step {last}) is kept" if last is not None else \
            "no checkpoint was written"
        raise NonFiniteError(f"non-finite loss or gradient at step {first_step}; training "
                             f"stopped without saving the bad state; {kept}")


def run_epochs(trainer: Trainer, flag: SignalFlag, writer, bar) -> dict:
    """Trains from the current state to the end; returns the last test metrics."""
    config, spe = trainer.config, trainer.steps_per_epoch
    start = int(trainer.state["step"])
    batches = data.make_train_iterator(config.data, global_batch_size=trainer.global_batch,
                                       seed=config.seed, start_step=start)
    history, pending, test, train_seconds, shown = [], None, {}, 0.0, {}
    for current in range(start, trainer.total_steps):
        tick = time.perf_counter()
        batch = step.global_batch(next(batches), trainer.shardings)
        trainer.state, metrics = trainer.train_step(trainer.state, batch)
        _check_finite(pending, current, trainer)  # the previous step's flag: no stall
        pending, done = metrics, current + 1
        history.append(metrics)
        if done % config.train.log_every_steps == 0 or done % spe == 0:
            mean = _mean_metrics(history[-config.train.log_every_steps:])
            shown = {"loss": mean["loss"], "acc": mean["accuracy"]}
        bar.update(1, **shown)
        train_seconds += time.perf_counter() - tick
        epoch_end, last = done % spe == 0, done == trainer.total_steps
        if epoch_end or last:
            _check_finite(pending, current + 1, trainer)
            test = end_epoch(trainer, history, done, writer, last)
            history = []
        if flag.any_process() and not last:
            _check_finite(pending, current + 1, trainer)  # never save after a bad step
            trainer.save(done // spe, -1.0)
            trainer.checkpoints.wait()
            raise Preempted(f"stopped by signal at step {done}: checkpoint saved in "
                            f"{trainer.checkpoints.directory}; run the same command to resume",
                            SIGNAL_EXIT_CODES.get(flag.received, 143))
    trainer.meta["train_seconds"] = trainer.meta.get("train_seconds", 0.0) + train_seconds
    return test


def end_epoch(trainer: Trainer, history, done: int, writer, last: bool) -> dict:
    config, spe = trainer.config, trainer.steps_per_epoch
    epoch = done / spe
    if history:
        writer.write(done, dict(_mean_metrics(history), epoch=epoch), "train")
    whole = int(np.ceil(epoch))
    test = {}
    if last or whole % config.train.eval_every_epochs == 0:
        test = trainer.evaluate()
        writer.write(done, dict(test, epoch=epoch), "test")
        if test["accuracy"] > trainer.meta["best_accuracy"]:
            trainer.meta.update(best_accuracy=test["accuracy"], best_loss=test["loss"],
                                best_epoch=epoch)
        trainer.meta.update(final=test)
    writer.flush()
    if last or whole % config.train.checkpoint_every_epochs == 0:
        trainer.save(whole, test.get("accuracy", -1.0))
    return test


def train_and_evaluate(config, workdir: str, overwrite: bool = False) -> dict:
    """Trains `config` in `workdir` (resuming from its latest checkpoint); returns results."""
    run_dir.prepare(config, workdir, overwrite)
    trainer = Trainer(config, workdir)
    resumed = trainer.restore_latest()  # a checkpoint that does not fit leaves DIR untouched
    run_dir.write_config(config, workdir)
    writer = report.MetricWriter(workdir, enabled=trainer.is_main)
    start = int(trainer.state["step"])
    bar = report.ProgressBar(trainer.total_steps, initial=start, desc="train",
                             enabled=trainer.is_main, batch_size=trainer.global_batch)
    started = time.perf_counter()
    try:
        with SignalFlag() as flag:
            run_epochs(trainer, flag, writer, bar)
    finally:
        bar.close()
        trainer.checkpoints.wait()
        writer.close()
    results = run_dir.results(trainer, resumed, start, time.perf_counter() - started)
    if trainer.is_main:
        run_dir.finish(workdir, results)
    trainer.checkpoints.close()
    return results
