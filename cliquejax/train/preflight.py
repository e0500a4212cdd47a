"""The checks a training run makes once, before it writes or trains anything.

Building the `Trainer` already reads both splits' headers and labels, builds the model, the
optimizer and the schedule and checks the image size against the network. This adds what
would otherwise surface at the first step or after the first epoch (when an epoch of work,
hours on real data, is lost), each as one-line ValueError naming the field:

- the seed, the loader's worker count, and every batch size against the device count;
- one real training batch through the pipeline (decoding, augmentation), and the train step
  traced on its shape: the model's forward and backward pass, the optimizer's update and the
  schedule, applied once to the abstract parameters (nothing is computed or changed);
- every test example decoded once, of the training split's shape and classes (a damaged
  test image would otherwise stop the run at its first evaluation);
- the first evaluation batch (viewed as evaluation sees it) and the evaluation step traced
  on it.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from cliquejax import cli, data
from cliquejax.data import sources
from cliquejax.train import step

MAX_SEED = 2**63 - 1  # numpy's generators take any non-negative int; JAX's keys an int64


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r}; allowed: an integer 0..{MAX_SEED}")


def check_fields_in_given_order(config, given: list[str]) -> None:
    """The checks of single fields (seed, train, optimizer, schedule, model, data: cheap,
    nothing read or traced), each run on its own, the first error raised in the order of the
    `--config.<field>` overrides `given` (then in the code's order): two wrong values on one
    command line are named as the user wrote them, not as the code happens to check them."""
    from cliquejax import models
    from cliquejax.models.common import check_range
    from cliquejax.train import loop, optim

    errors = []
    for check in (lambda: check_seed(config.seed),
                  *(functools.partial(check_range, f"train.{field}", config.train[field], 1)
                    for field in loop.TRAIN_COUNTS),
                  lambda: optim._validate_optimizer(config.optimizer),
                  lambda: optim.check_schedule(config.schedule, float(config.optimizer.lr)),
                  lambda: models.check(config.model),
                  lambda: sources.check_fields(config.data)):
        try:
            check()
        except ValueError as error:
            errors.append(error)
    fields = [argument.split("=", 1)[0].removeprefix("--config.") for argument in given]

    def rank(error) -> int:
        named = [i for i, field in enumerate(fields) if str(error).startswith(field + "=")]
        return named[0] if named else len(fields)

    if errors:
        raise min(errors, key=rank)  # the first of equal rank: the code's order


def check_batch_sizes(train_config) -> None:
    devices = jax.device_count()
    for field in ("batch_size", "eval_batch_size"):
        size = train_config[field]
        if size % devices:
            raise ValueError(f"train.{field}={size} is not divisible by the {devices} devices; "
                             f"allowed: a multiple of {devices}")


def _one_process_data(data_config):
    """`data_config` reading in this process: a check needs no loader workers."""
    copied = data_config.copy_and_resolve_references()
    if "worker_count" in copied:
        with copied.unlocked():
            # the field's own type: a text ('auto') now, a number in older config.json files
            copied.worker_count = type(copied.worker_count)(0)
    return copied


def check_test_set(data_config, info) -> None:
    """Every test example decoded once (the headers were checked when the source opened;
    a file whose pixels are damaged fails only here), of the run's shape and classes."""
    test = data.load_source(data_config, "test")
    arrays = sources.as_arrays(test)  # an in-memory split: read once, for the pipeline too
    if arrays is not None:
        images, labels = arrays
        bad = np.flatnonzero((labels < 0) | (labels >= info.num_classes))
        if images.shape[1:] != tuple(info.image_shape) or len(bad):
            index = int(bad[0]) if len(bad) else 0
            _refuse(f"test example {index}", images.shape[1:], int(labels[index]), info)
        return
    for index in range(len(test)):
        example = test[index]
        shape, label = tuple(example["image"].shape), int(example["label"])
        if shape != tuple(info.image_shape) or not 0 <= label < info.num_classes:
            name = test.files[index] if hasattr(test, "files") else f"test example {index}"
            _refuse(name, shape, label, info)


def _refuse(name: str, shape, label: int, info) -> None:
    raise ValueError(f"{name} has shape {tuple(shape)} and label {label}; allowed: shape "
                     f"{tuple(info.image_shape)} and labels 0..{info.num_classes - 1}, as the "
                     "training split")


def _abstract(batch: dict) -> dict:
    """Shapes, dtypes and shardings of a placed batch: what tracing a step needs."""
    return {key: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=value.sharding)
            for key, value in batch.items()}


def check(trainer) -> None:
    """Runs every check above for `trainer` (a `loop.Trainer` built for a run)."""
    config = trainer.config
    check_seed(config.seed)
    check_batch_sizes(config.train)
    data.pipeline.worker_count(config.data)  # 'auto' or a count >= 0, else one line
    data_config = _one_process_data(config.data)
    stats = (trainer.info.mean, trainer.info.std)
    batches = data.make_train_iterator(data_config, global_batch_size=trainer.global_batch,
                                       seed=config.seed, start_step=0, stats=stats)
    batch = step.global_batch(next(batches), trainer.shardings)
    try:
        trainer.train_step.trace(trainer.state, _abstract(batch))
    except (TypeError, ValueError, ZeroDivisionError) as error:
        raise ValueError(f"the train step cannot be built for this config (optimizer "
                         f"{config.optimizer.name!r}, schedule {config.schedule.name!r}): "
                         f"{cli.first_line(error)}") from None
    check_test_set(data_config, trainer.info)
    evaluation = data.make_eval_iterator(data_config,
                                         global_batch_size=config.train.eval_batch_size,
                                         stats=stats)
    first = next(evaluation, None)
    if first is not None:
        # traced, not run: a trace finds what a bad batch breaks, at no compile and without
        # a program (and its collectives) before the loop's first step
        trainer.eval_step.trace(trainer.state, _abstract(
            step.global_batch(first, trainer.eval_shardings)))
