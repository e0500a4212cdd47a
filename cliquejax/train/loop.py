"""The training loop: epochs, evaluation, checkpoints, metrics, signals. It owns every side
effect; the jitted steps (`step.py`) stay pure."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cliquejax import bits, checkpoint, cli, data, models, platform, report, summary, targets
from cliquejax.data import augment
from cliquejax.models.common import check_range
from cliquejax.train import optim, preflight, run_dir, step

SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class NonFiniteError(RuntimeError):
    pass


class Preempted(Exception):  # noqa: N818 - a stop, not an error
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# Multi-process: how often the processes agree on a signal. Each agreement is one exchange
# through JAX's coordination service (host to host, no device program), read one step
# later, so a signal stops every process within SIGNAL_SYNC_STEPS + 1 steps.
SIGNAL_SYNC_STEPS = 10
_KEY_WAIT_MS = 10 * 60 * 1000  # processes stay within a step of each other (the steps'
# all-reduces): a longer wait means a process is gone


class SignalFlag:
    """Records SIGTERM / SIGINT so the loop can finish the step and save a checkpoint.

    `stop_after(done)` gives every process the same answer at the same step: with one
    process, whether a signal came; with several, every SIGNAL_SYNC_STEPS steps each one
    posts its flag to the coordination service's key-value store and, one step later, all
    read every flag. No device collective is added to the steps (a device one, on XLA:CPU,
    could interleave with a step's all-reduces differently on each process and hang them).
    `agreements` counts the exchanges started."""

    _runs = 0  # flags made in this program: the same count on every process

    def __init__(self, every: int = SIGNAL_SYNC_STEPS):
        self.received = None
        self.every = every
        self.agreements = 0
        self._previous = {}
        self._posted = None  # the step after which this process last posted its flag
        SignalFlag._runs += 1
        self._prefix = f"cliquejax/signal/{SignalFlag._runs}"

    def __enter__(self):
        for sig in SIGNAL_EXIT_CODES:
            self._previous[sig] = signal.signal(sig, self._handle)
            # The signal may land on any thread: restart the system calls it interrupts
            # (gloo's sockets between processes), instead of failing them with EINTR.
            signal.siginterrupt(sig, False)
        return self

    def _handle(self, signum, _frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _key(self, done: int, process: int) -> str:
        return f"{self._prefix}/{done}/{process}"

    def stop_after(self, done: int) -> bool:
        """Whether every process stops after step `done` (the same answer on each)."""
        if jax.process_count() == 1:
            return self.received is not None
        from orbax.checkpoint import multihost

        client = multihost.get_jax_distributed_client()
        stop = False
        if self._posted == done - 1:
            stop = any(client.blocking_key_value_get(self._key(self._posted, p), _KEY_WAIT_MS)
                       == "1" for p in range(jax.process_count()))
        if done % self.every == 0:
            client.key_value_set(self._key(done, jax.process_index()),
                                 "1" if self.received is not None else "0")
            if self._posted is not None:  # read by every process by now: a step behind at most
                client.key_value_delete(self._key(self._posted - self.every,
                                                  jax.process_index()))
            self._posted, self.agreements = done, self.agreements + 1
        return stop


TRAIN_COUNTS = ("epochs", "batch_size", "eval_batch_size", "log_every_steps",
                "eval_every_epochs", "checkpoint_every_epochs", "keep_checkpoints")


def validate_train(train) -> None:
    for field in TRAIN_COUNTS:
        check_range(f"train.{field}", train[field], 1)
    step.bn_statistics(train)
    check_range("train.peak_flops", train.get("peak_flops", 0.0), 0)
    check_range("train.checkpoint_every_steps", train.get("checkpoint_every_steps", 0), 0)
    steps = tuple(train.get("profile_steps", ()))
    if steps and not (len(steps) == 2 and all(isinstance(s, int) for s in steps)
                      and 1 <= steps[0] <= steps[1]):
        raise ValueError(f"train.profile_steps={train.profile_steps!r} is not a range of "
                         "steps; allowed: START,END with 1 <= START <= END (step 1 is the "
                         "run's first), or () for no profile")


class StepProfile:
    """`train.profile_steps=(START, END)`: a `jax.profiler` trace of the run's steps START
    to END (both included; step 1 is the first) in the run directory, where TensorBoard's
    profile plugin reads it (`plugins/profile/<time>/<host>.xplane.pb`, beside the
    scalars). A resumed run traces what is left of the range."""

    def __init__(self, steps, workdir: str):
        self.first, self.last = tuple(steps) if steps else (0, -1)
        self.workdir, self.active = workdir, False

    def before(self, number: int) -> None:
        """Before step `number` is dispatched."""
        if not self.active and self.first <= number <= self.last:
            jax.profiler.start_trace(self.workdir)
            self.active = True

    def after(self, number: int, state) -> None:
        """After step `number` was dispatched: the trace ends once the last step ran."""
        if self.active and number >= self.last:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def build_model_and_transforms(config, image_shape, num_classes: int, steps_per_epoch: int):
    """(model, optimizer transforms, lr schedule, binary mask or None) of a run: what
    `Trainer` trains and `cliquejax.lower` lowers. The mask marks the weights the model's
    layers store in 1 bit (`cliquejax.bits`); None for a model without binary layers."""
    model = models.build_model(config, num_classes)
    tx, schedule = optim.make_optimizer(config, steps_per_epoch)
    variables = bits.abstract_variables(model, image_shape)
    binary = bits.binary_mask(variables) if bits.has_quantized_layers(variables) else None
    return model, step.make_transforms(config, tx, variables["params"]), schedule, binary


def device_views(config, image_shape, mean, std):
    """(train view, eval view): the pipeline's uint8 batch to the network's input inside the
    jitted steps (`augment.device_view`: the cifar augmentation when training, then the
    normalisation with `mean` and `std`)."""
    view = functools.partial(
        augment.device_view, mean=mean, std=std, seed=config.seed,
        augmentation=data.pipeline.augmentation_from_config(config.data, image_shape))
    return functools.partial(view, train=True), view


class Trainer:
    """Everything a run needs, built once from the config. Building it reads the data and
    traces nothing to disk; the checkpoint directory is opened on first use."""

    def __init__(self, config, workdir: str, create_checkpoints: bool = True, info=None):
        validate_train(config.train)
        platform.no_cache_across_cpu_processes()  # before the run's first compile
        self.config, self.workdir = config, workdir
        self.is_main = jax.process_index() == 0
        # `info`: the run's recorded data description (`run_dir.dataset_for_run`)
        self.info = info if info is not None else data.dataset_info(config.data)
        self.global_batch = config.train.batch_size
        self.steps_per_epoch = data.steps_per_epoch(self.info, self.global_batch)
        self.total_steps = config.train.epochs * self.steps_per_epoch
        if config.train.max_steps > 0:
            self.total_steps = min(self.total_steps, config.train.max_steps)
        self.model, self.transforms, self.schedule, binary_mask = build_model_and_transforms(
            config, self.info.image_shape, self.info.num_classes, self.steps_per_epoch)
        self.shardings = step.make_shardings(self.global_batch)
        check_image_size(self.model, self.info, config.model.name)
        self.state = step.initial_state(self.model, self.transforms, self.info.image_shape,
                                        config.seed, self.shardings.replicated)
        train_view, eval_view = device_views(config, self.info.image_shape, self.info.mean,
                                             self.info.std)
        self.train_step, self.eval_step = step.jit_steps(
            self.model, self.transforms, self.schedule, config, self.shardings, self.state,
            binary_mask, train_view=train_view, eval_view=eval_view)
        self._create_checkpoints = create_checkpoints
        self._checkpoints = None
        self.running = None  # the loop's RunningMeans, saved with each checkpoint
        self.meta = {"best_accuracy": -1.0, "best_loss": None, "epoch": 0}
        # Seconds of this session; the meta carries those of earlier sessions.
        self.session_started, self.session_train_seconds = time.perf_counter(), 0.0
        self.session_timed_steps = 0  # the steps in session_train_seconds
        self._base_seconds = {"train_seconds": 0.0, "wall_seconds": 0.0, "timed_steps": 0.0}

    @property
    def checkpoints(self) -> checkpoint.Checkpointer:
        if self._checkpoints is None:
            directory = os.path.join(self.workdir, "checkpoints")
            if not self._create_checkpoints and not os.path.isdir(directory):
                raise FileNotFoundError(f"no checkpoint in {directory}; train first "
                                        "(--mode=train) or point --workdir at a run")
            self._checkpoints = checkpoint.Checkpointer(
                directory, keep=self.config.train.keep_checkpoints,
                read_only=not self._create_checkpoints)  # a reader (eval, predict, export)
        return self._checkpoints

    def restore_latest(self, move_aside: bool = True) -> bool:
        """Restores the newest good checkpoint; False when there is none. A damaged one is
        reported on stderr and (with `move_aside`) moved to checkpoints-corrupt/."""
        if not self.checkpoints.all_steps():
            return False
        warn = (lambda line: print(line, file=sys.stderr, flush=True)) if self.is_main else \
            (lambda line: None)
        self.state, meta = self.checkpoints.restore_good(self.state, warn,
                                                         move_aside=move_aside)
        self.meta.update(meta)
        self._base_seconds = {key: float(self.meta.get(key, 0.0)) for key in self._base_seconds}
        if "timed_steps" not in self.meta:  # saved before the first step went untimed
            self._base_seconds["timed_steps"] = float(int(self.state["step"]))
        return True

    def seconds(self) -> dict:
        """train_seconds (in the steps timed: each session's but its first), timed_steps and
        wall_seconds of the run so far, over all sessions."""
        return {"train_seconds": self._base_seconds["train_seconds"] + self.session_train_seconds,
                "timed_steps": self._base_seconds["timed_steps"] + self.session_timed_steps,
                "wall_seconds": self._base_seconds["wall_seconds"]
                + time.perf_counter() - self.session_started}

    def evaluate(self) -> dict:
        totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        batches = data.make_eval_iterator(self.config.data,
                                          global_batch_size=self.config.train.eval_batch_size,
                                          stats=(self.info.mean, self.info.std))
        shardings = self.eval_shardings
        # several CPU processes: each batch finishes before the next starts; evaluation
        # steps are independent, so several could be in flight, and two processes could
        # take their all-reduces in different orders (an accelerator runs them in order)
        serial = platform.cpu_processes()
        sums = []
        for local in batches:
            sums.append(self.eval_step(self.state, step.global_batch(local, shardings)))
            if serial:
                jax.block_until_ready(sums[-1])
        for batch_sums in jax.device_get(sums):
            for key, value in batch_sums.items():
                totals[key] += float(value)
        count = max(totals["count"], 1.0)
        return {"loss": totals["loss"] / count, "accuracy": totals["correct"] / count,
                "examples": int(totals["count"])}

    @property
    def eval_shardings(self):
        return step.make_shardings(self.config.train.eval_batch_size)

    def save(self, epoch: int, accuracy: float) -> None:
        step_now = int(self.state["step"])
        meta = dict(self.meta, epoch=epoch, step=step_now, accuracy=accuracy, **self.seconds())
        if self.running is not None:
            meta["running"] = self.running.state()
        try:
            self.checkpoints.save(step_now, self.state, meta, force=True)
        except checkpoint.CheckpointSaveError as error:
            raise save_failed(self, error) from None

    def check_saves(self) -> None:
        """Stops the run as soon as a checkpoint written in the background has failed."""
        if self._checkpoints is not None:
            try:
                self._checkpoints.check()
            except checkpoint.CheckpointSaveError as error:
                raise save_failed(self, error) from None

    def fingerprint(self) -> str:
        return checkpoint.params_fingerprint(
            {"params": self.state["params"], "batch_stats": self.state["batch_stats"]})


def save_failed(trainer: Trainer, error) -> checkpoint.CheckpointSaveError:
    steps = trainer.checkpoints.committed_steps()
    kept = f"the last good checkpoint (step {steps[-1]}) is kept" if steps else \
        "no checkpoint was kept"
    return checkpoint.CheckpointSaveError(f"{error}; training stopped; {kept}")


# The deepest downsampling here (the ImageNet CliqueNet: stem, max pool, 3 transitions)
# divides the size by 32: larger images always keep pixels, and skip the check's trace.
CHECKED_BELOW = 64


def check_image_size(model, info, name: str) -> None:
    """Images too small for the network's downsampling leave a stage with no pixels, and
    the pooled features are then empty (NaN) instead of an error."""
    from flax import linen as nn

    if min(info.image_shape[:2]) >= CHECKED_BELOW:
        return
    abstract = bits.abstract_variables(model, info.image_shape)
    variables = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}

    def forward(variables, x):
        with nn.intercept_methods(_record_empty):
            return model.apply(variables, x, train=False)

    _EMPTY.clear()
    image = jax.ShapeDtypeStruct((1, *info.image_shape), np.float32)
    try:
        outputs = jax.eval_shape(forward, variables, image)
    except (ValueError, TypeError, ZeroDivisionError) as error:
        raise ValueError(f"images of {info.image_shape[0]}x{info.image_shape[1]} do not fit "
                         f"model {name} ({cli.first_line(error, 200)}); allowed: images "
                         "as large as the network's downsampling needs") from None
    empty = list(_EMPTY) + [tuple(o.shape) for o in jax.tree.leaves(outputs) if 0 in o.shape]
    if empty:
        raise ValueError(f"images of {info.image_shape[0]}x{info.image_shape[1]} are too small "
                         f"for model {name}: a layer's output {empty[0]} has no pixels; "
                         "allowed: larger images (data.image_size resizes image folders and "
                         "synthetic data)")


_EMPTY: list = []


def _record_empty(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    for leaf in jax.tree.leaves(out):
        if hasattr(leaf, "shape") and 0 in leaf.shape:
            _EMPTY.append(f"{type(context.module).__name__} {tuple(leaf.shape)}")
    return out


class RunningMeans:
    """Sums of the step metrics over the current log window (row 0) and epoch (row 1), kept
    on the device by one jitted call per step: a mean is read with one transfer per metric
    instead of one per metric and step."""

    WINDOW, EPOCH = 0, 1

    def __init__(self):
        self.sums, self.counts = None, [0, 0]

    def add(self, metrics: dict) -> None:
        keep = tuple(count > 0 for count in self.counts)  # a row with no step starts anew
        self.sums = _add_sums(self.sums, metrics, keep) if any(keep) else _start_sums(metrics)
        self.counts = [count + 1 for count in self.counts]

    def mean(self, row: int) -> dict | None:
        """Means over `row`'s steps (None before any), then a new `row` starts."""
        count, self.counts[row] = self.counts[row], 0
        if count == 0:
            return None
        return {key: float(value[row]) / count for key, value in
                jax.device_get(self.sums).items()}

    def state(self) -> dict:
        """The sums and counts as JSON (a checkpoint's meta): a run resumed mid-window or
        mid-epoch logs the means an uninterrupted run logs, bit for bit (float32 sums)."""
        sums = {} if self.sums is None else {
            key: [float(v) for v in value] for key, value in jax.device_get(self.sums).items()}
        return {"counts": list(self.counts), "sums": sums}

    @classmethod
    def restored(cls, state: dict | None) -> RunningMeans:
        means = cls()
        if state and state.get("sums"):
            means.counts = [int(count) for count in state["counts"]]
            # host arrays: every process passes the same, as for any host value of a step
            means.sums = {key: np.asarray(value, np.float32)
                          for key, value in state["sums"].items()}
        return means


@jax.jit
def _start_sums(metrics):
    return {key: jnp.stack([value, value]).astype(jnp.float32)
            for key, value in metrics.items()}


@functools.partial(jax.jit, static_argnums=2)
def _add_sums(sums, metrics, keep):
    kept = jnp.asarray(keep, jnp.float32)
    return {key: sums[key] * kept + value.astype(jnp.float32) for key, value in metrics.items()}


class StepLog:
    """The `train_step` rows (metrics.jsonl, TensorBoard) written every `log_every_steps`:
    the window's mean loss and accuracy (the flip ratio, gradient norm...), the learning
    rate at the window's last step, and what the host timed over the window: step time,
    images/s, MFU (the step's counted FLOPs, `summary.jaxpr_macs`, over the devices' peak:
    `train.peak_flops` per device, else the device kind's in `cliquejax.targets`; no MFU
    where neither is known, as on a CPU) and device memory where the backend reports it.
    Reads on the host only what the window's mean already reads: no extra device sync."""

    TIMING = ("step_seconds", "images_per_second", "mfu", "memory_bytes_in_use",
              "memory_peak_bytes_in_use")

    def __init__(self, trainer: Trainer, writer, batch):
        self.trainer, self.writer = trainer, writer
        self.mark_time, self.mark_step = None, None
        config = trainer.config
        device = jax.local_devices()[0]
        peak = float(config.train.get("peak_flops", 0.0)) or targets.peak_flops(
            device.device_kind, config.train.get("compute_dtype", "float32"))
        self.peak = None if peak is None else peak * jax.device_count()
        self.flops = None
        if self.peak is not None:  # one trace of the step (no compilation), counted once
            traced = trainer.train_step.trace(trainer.state, batch)
            self.flops = 2 * int(sum(summary.jaxpr_macs(traced.jaxpr.jaxpr).values()))
        self.device = device

    def mark(self, step: int) -> None:
        """Times from now, `step` steps done (after compiling, evaluating, saving)."""
        self.mark_time, self.mark_step = time.perf_counter(), step

    def write(self, done: int, window: dict | None, last: dict) -> None:
        """The row of the window that ended with step `done` (nothing for an empty one);
        `last`: that step's metrics, already read (its finite flag)."""
        if window is None:
            return
        trainer = self.trainer
        row = dict(window, lr=float(last["lr"]), epoch=done / trainer.steps_per_epoch)
        if self.mark_step is not None and done > self.mark_step:
            seconds = (time.perf_counter() - self.mark_time) / (done - self.mark_step)
            row.update(step_seconds=seconds,
                       images_per_second=trainer.global_batch / seconds)
            if self.flops is not None:
                row["mfu"] = self.flops / seconds / self.peak
        memory = self.device.memory_stats() or {}
        for key in ("bytes_in_use", "peak_bytes_in_use"):
            if key in memory:
                row[f"memory_{key}"] = int(memory[key])
        self.writer.write(done, row, "train_step")
        self.mark(done)


def log_window(means: RunningMeans, log: StepLog, done: int, last: dict | None,
               shown: dict) -> None:
    """The window ending with step `done` (whose metrics are `last`): its row written, its
    means shown in the bar."""
    window = means.mean(RunningMeans.WINDOW)
    show_mean(window, shown)
    if last is not None:
        log.write(done, window, last)


def show_mean(mean: dict | None, shown: dict) -> None:
    """The progress bar's loss and accuracy from `mean` (a log window's means)."""
    if mean:
        shown.update(loss=mean["loss"], acc=mean["accuracy"])


def _check_finite(pending, first_step: int, trainer: Trainer) -> None:
    if pending is not None and float(pending["finite"]) == 0.0:
        last = trainer.checkpoints.latest_step()
        kept = f"the last good checkpoint (step {last}) is kept" if last is not None else \
            "no checkpoint was written"
        raise NonFiniteError(f"non-finite loss or gradient at step {first_step}; training "
                             f"stopped without saving the bad state; {kept}")


def run_epochs(trainer: Trainer, flag: SignalFlag, writer, bar, profile=None) -> dict:
    """Trains from the current state to the end; returns the last test metrics.

    The host stays at most one step ahead of the device and never waits for the step it
    has just dispatched: the finite-loss flag and the logged metrics are read one step
    late, and the next batch is placed while the step runs."""
    config, spe = trainer.config, trainer.steps_per_epoch
    log_every = config.train.log_every_steps
    every_steps = config.train.get("checkpoint_every_steps", 0)
    every_epochs = config.train.checkpoint_every_epochs
    start = int(trainer.state["step"])
    batches = data.make_train_iterator(config.data, global_batch_size=trainer.global_batch,
                                       seed=config.seed, start_step=start,
                                       stats=(trainer.info.mean, trainer.info.std))
    # the sums of the window and epoch a checkpoint was saved in (mid-window, mid-epoch)
    means = RunningMeans.restored(trainer.meta.get("running"))
    trainer.running, pending, test, shown = means, None, {}, {}
    batch = step.global_batch(next(batches), trainer.shardings)
    log = StepLog(trainer, writer, batch)
    for current in range(start, trainer.total_steps):
        tick = time.perf_counter()
        if profile:
            profile.before(current + 1)
        trainer.state, metrics = trainer.train_step(trainer.state, batch)
        if current == start:
            log.mark(start)  # compiled: the rows time the steps from here
        done, last = current + 1, current + 1 == trainer.total_steps
        if profile:
            profile.after(done, trainer.state)
        if not last:
            batch = step.global_batch(next(batches), trainer.shardings)
        _check_finite(pending, current, trainer)  # the previous step's flag: no stall
        trainer.check_saves()
        if current % log_every == 0:  # step `current` ended a window (if not logged yet)
            log_window(means, log, current, pending, shown)
        pending = metrics
        means.add(metrics)
        bar.update(1, **shown)
        if current > start:  # a session's first step compiles the step: no step's time
            trainer.session_train_seconds += time.perf_counter() - tick
            trainer.session_timed_steps += 1
        if done % spe == 0 or last:
            _check_finite(pending, current + 1, trainer)
            if done % log_every == 0:  # its window, now: the epoch's end waits for it anyway
                log_window(means, log, done, pending, shown)
            test = end_epoch(trainer, means.mean(RunningMeans.EPOCH), done, writer, last,
                             bar) or test
            log.mark(done)  # the evaluation and the save are not steps
            if test:
                shown["test"] = f"{100 * test['accuracy']:.2f}%"
                bar.show(test=shown["test"])
        if every_steps and done % every_steps == 0 and not last and not (
                done % spe == 0 and (done // spe) % every_epochs == 0):  # saved: the epoch's
            _check_finite(pending, current + 1, trainer)  # never save after a bad step
            if done % log_every == 0:
                log_window(means, log, done, pending, shown)
            trainer.save(done // spe, -1.0)
            writer.flush()
            log.mark(done)
        if flag.stop_after(done) and not last:
            _check_finite(pending, current + 1, trainer)  # never save after a bad step
            if done % log_every == 0:
                log_window(means, log, done, pending, shown)
            trainer.save(done // spe, -1.0)
            trainer.checkpoints.wait()
            raise Preempted(f"stopped by signal at step {done}: checkpoint saved in "
                            f"{trainer.checkpoints.directory}; run the same command to resume",
                            SIGNAL_EXIT_CODES.get(flag.received, 143))
    return test


def end_epoch(trainer: Trainer, train_mean: dict | None, done: int, writer, last: bool,
              bar) -> dict:
    config, spe = trainer.config, trainer.steps_per_epoch
    epoch = done / spe
    if train_mean:
        writer.write(done, dict(train_mean, epoch=epoch), "train")
    whole = int(np.ceil(epoch))
    test = {}
    if last or whole % config.train.eval_every_epochs == 0:
        test = trainer.evaluate()
        writer.write(done, dict(test, epoch=epoch), "test")
        if test["accuracy"] > trainer.meta["best_accuracy"]:
            trainer.meta.update(best_accuracy=test["accuracy"], best_loss=test["loss"],
                                best_epoch=epoch)
        trainer.meta.update(final=test)
        bar.write(f"epoch {epoch:g} (step {done}): test accuracy {100 * test['accuracy']:.2f}%"
                  f", loss {test['loss']:.4g}; best {100 * trainer.meta['best_accuracy']:.2f}%"
                  f" (epoch {trainer.meta['best_epoch']:g})")
    saving = last or whole % config.train.checkpoint_every_epochs == 0
    if test or saving:  # TensorBoard's events reach the disk (an fsync) where the loop stops
        writer.flush()  # anyway; its own thread flushes them every two minutes besides
    if saving:
        trainer.save(whole, test.get("accuracy", -1.0))
    return test


def train_and_evaluate(config, workdir: str, overwrite: bool = False,
                       accept_data_change: bool = False) -> dict:
    """Trains `config` in `workdir` (resuming from its latest good checkpoint); returns the
    results. Every check (workdir lock, config.json, the data against the run's data.json,
    model, `preflight`, checkpoint fit) runs before anything in `workdir` changes;
    `overwrite` then moves an old run aside."""
    validate_train(config.train)
    config = run_dir.resolve_auto(config)  # config.json records the precision that runs
    created = not os.path.exists(workdir)
    run_dir.check_writable(workdir)
    lock = run_dir.WorkdirLock(workdir)
    try:
        lock.acquire()
        changes = run_dir.check_resume(config, workdir, overwrite)
        info, record, data_changes = run_dir.dataset_for_run(
            config.data, workdir, fresh=overwrite or not run_dir.holds_checkpoint(workdir),
            accept_change=accept_data_change)
        if data_changes:
            changes = dict(changes, data=data_changes)
        trainer = Trainer(config, workdir, info=info)
        preflight.check(trainer)
        if overwrite:
            run_dir.move_aside(workdir)
        resumed = trainer.restore_latest()  # a checkpoint that does not fit changes nothing
    except BaseException:
        lock.release()
        if created and jax.process_index() == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    try:
        return _train(trainer, config, workdir, resumed, changes, record)
    finally:
        lock.release()


def _train(trainer: Trainer, config, workdir: str, resumed: bool, changes: dict,
           record) -> dict:
    start = int(trainer.state["step"])
    platform.announce_runtime()  # every check passed: the run's first line
    run_dir.write_config(config, workdir, changes, start)
    run_dir.write_data_record(workdir, record)
    if trainer.is_main:  # rows past the checkpoint resumed from are trained again
        report.drop_rows_after(os.path.join(workdir, report.METRICS_FILE), start)
    writer = report.MetricWriter(workdir, enabled=trainer.is_main)
    # the config (with this session's allowed changes) beside the curves: TensorBoard's Text
    writer.text("config", "```json\n" + config.to_json_best_effort(indent=2, sort_keys=True)
                + "\n```", start)
    bar = report.ProgressBar(trainer.total_steps, initial=start, desc="train",
                             enabled=trainer.is_main, batch_size=trainer.global_batch)
    trainer.session_started = time.perf_counter()
    failed = True
    try:
        with SignalFlag() as flag, StepProfile(config.train.get("profile_steps", ()),
                                               workdir) as profile:
            run_epochs(trainer, flag, writer, bar, profile)
        failed = False
    finally:
        bar.close()
        try:
            trainer.checkpoints.wait()
        except checkpoint.CheckpointSaveError as error:
            if not failed:
                raise save_failed(trainer, error) from None
        writer.close()
    seconds = trainer.seconds()
    trainer.meta.update(train_seconds=seconds["train_seconds"],
                        timed_steps=seconds["timed_steps"])
    results = run_dir.results(trainer, resumed, start, seconds["wall_seconds"])
    if trainer.is_main:
        run_dir.finish(workdir, results)
    trainer.checkpoints.close()
    if flag.received is not None:  # during the last step or its evaluation: nothing left to do
        raise Preempted(f"interrupted at the last step ({trainer.total_steps}): the run is "
                        f"complete, {os.path.join(workdir, 'results.json')} written",
                        SIGNAL_EXIT_CODES.get(flag.received, 143))
    return results
