"""Deterministic, resumable, multi-host pipelines for training and evaluation.

Train order: epoch e visits the training examples in `permutation(seed, e)`; global step s
of the epoch takes positions s*G .. s*G+G-1 of it (G: global batch), and process p takes
the p-th contiguous slice of B = G / process_count positions. The random augmentation of
the example at position q of epoch e depends on (seed, e, q) only. So a batch is a pure
function of (seed, global step, process layout), the union over processes equals the
one-process batch, and starting at any step needs no replay.

The host yields uint8 batches, `{"image": uint8 [B, H, W, C], "label": int32 [B],
"position": int32 [B, 2]}` ((e, q) of each example) for training, `{"image", "label",
"mask"}` for evaluation; the jitted step finishes them (`augment.device_view`: the "cifar"
flip and crop, the normalisation), so a quarter of float32's bytes cross to the device.
A source held in memory (`sources.as_arrays`: npz, digits, TFDS and synthetic data sets of
fixed-size images) gives each batch as one numpy gather, with no per-example Python; image
folders and resized TFDS images are decoded example by example by grain, in
`data.worker_count` worker processes ("auto": none on a CPU-only host, where the cores
compute the step; else one per core but one, at most `MAX_AUTO_WORKERS`).

`config.data.augment` (cifar | imagenet | none, see `augment`) picks the training
augmentation and the evaluation view. The "imagenet" crops run on the host and read an
image folder's images at their own size; every other choice reads them as the source
gives them.
"""

from __future__ import annotations

import os
import sys

import grain
import jax
import numpy as np
from absl import flags

from cliquejax import platform
from cliquejax.data import augment, info, local_sources, sources

_PERMUTATION_STREAM = 0
READ_THREADS = 1  # measured: more threads only contend for the GIL on these small examples
PREFETCH_BATCHES = 8
MAX_AUTO_WORKERS = 16


def steps_per_epoch(dataset: info.DatasetInfo, global_batch_size: int) -> int:
    """Full global batches per epoch (the remainder of the epoch is dropped)."""
    steps = dataset.num_train // global_batch_size
    if steps == 0:
        raise ValueError(
            f"global batch size {global_batch_size} is larger than {dataset.name}'s "
            f"{dataset.num_train} training examples"
        )
    return steps


def process_layout(global_batch_size: int, process_index=None, process_count=None):
    """(process_index, process_count, per-process batch size), checked."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size <= 0:
        raise ValueError(f"global batch size {global_batch_size} must be positive")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in 0..{process_count - 1}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the "
            f"{process_count} processes"
        )
    return process_index, process_count, global_batch_size // process_count


class _EpochOrder:
    """Which examples, at which positions of their epoch, a process's steps take."""

    def __init__(self, num_examples, *, seed, steps_in_epoch, global_batch, local_batch,
                 process_index):
        self.num_examples = num_examples
        self.seed = seed
        self.steps_in_epoch = steps_in_epoch
        self.global_batch = global_batch
        self.local_batch = local_batch
        self.process_index = process_index
        self._permutations: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        permutation = self._permutations.get(epoch)
        if permutation is None:
            rng = np.random.default_rng([self.seed, _PERMUTATION_STREAM, epoch])
            permutation = rng.permutation(self.num_examples)
            self._permutations[epoch] = permutation
            # Prefetching threads may still be finishing the previous epoch.
            self._permutations.pop(epoch - 2, None)
        return permutation

    def first_position(self, step: int) -> tuple[int, int]:
        """(epoch, position in the epoch of this process's first example) at `step`."""
        epoch, step_in_epoch = divmod(step, self.steps_in_epoch)
        return epoch, step_in_epoch * self.global_batch + self.process_index * self.local_batch


def _positions(epoch: int, positions) -> np.ndarray:
    """int32 [B, 2] rows (epoch, position): the key of each example's augmentation."""
    positions = np.asarray(positions, np.int32)
    return np.stack([np.full_like(positions, epoch), positions], axis=-1)


class _ArrayTrainBatches:
    """This process's training batches of an in-memory source, one gather per batch."""

    def __init__(self, images, labels, order: _EpochOrder, start_step: int):
        self.images, self.labels, self.order, self.step = images, labels, order, start_step

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        epoch, first = self.order.first_position(self.step)
        self.step += 1
        positions = np.arange(first, first + self.order.local_batch)
        indices = self.order.permutation(epoch)[positions]
        return {"image": self.images[indices], "label": self.labels[indices],
                "position": _positions(epoch, positions)}


def _array_eval_batches(images, labels, *, num_steps, global_batch, local_batch,
                        process_index):
    """This process's evaluation batches of an in-memory source; the positions past the
    end are zero images with mask 0."""
    slots = np.arange(local_batch)
    for step in range(num_steps):
        positions = step * global_batch + process_index * local_batch + slots
        real = positions < len(labels)
        indices = np.where(real, positions, 0)
        image = images[indices]
        image[~real] = 0
        yield {"image": image, "label": np.where(real, labels[indices], 0).astype(np.int32),
               "mask": real.astype(np.float32)}


class _TrainExampleReader:
    """Maps a per-process element number to its training example, read (and for the
    "imagenet" augmentation cropped) on the host."""

    def __init__(self, source, order: _EpochOrder, augmentation: augment.Augmentation):
        self.source, self.order, self.augmentation = source, order, augmentation

    def __call__(self, element: int) -> dict:
        step, slot = divmod(int(element), self.order.local_batch)
        epoch, first = self.order.first_position(step)
        position = first + slot
        example = self.source[int(self.order.permutation(epoch)[position])]
        rng = (np.random.default_rng([self.order.seed, augment.AUGMENTATION_STREAM, epoch,
                                      position])
               if self.augmentation.name == "imagenet" else None)  # the host's only random part
        return {"image": self.augmentation.host_train(example["image"], rng),
                "label": np.int32(example["label"]),
                "position": np.array([epoch, position], np.int32)}


class _EvalExampleReader:
    """Maps a per-process element number to a test example, or to masked-out padding."""

    def __init__(
        self, source, *, image_shape, global_batch, local_batch, process_index, augmentation
    ):
        self.source = source
        self.image_shape = image_shape
        self.augmentation = augmentation
        self.global_batch = global_batch
        self.local_batch = local_batch
        self.process_index = process_index

    def __call__(self, element: int) -> dict:
        step, slot = divmod(int(element), self.local_batch)
        position = step * self.global_batch + self.process_index * self.local_batch + slot
        if position >= len(self.source):
            image = np.zeros(self.image_shape, np.uint8)
            return {"image": image, "label": np.int32(0), "mask": np.float32(0.0)}
        example = self.source[position]
        return {
            "image": self.augmentation.evaluate(example["image"]),
            "label": np.int32(example["label"]),
            "mask": np.float32(1.0),
        }


class _NativeImageFolder:
    """An image folder's examples decoded at their own size: `ImageFolderSource` squashes
    every image to image_size x image_size, the wrong input for a random-resized crop and
    for the evaluation's aspect-preserving resize."""

    def __init__(self, folder: local_sources.ImageFolderSource):
        self.files, self.labels = folder.files, folder.labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        return {"image": local_sources.decode_image(self.files[index]),
                "label": self.labels[index]}


def augmentation_from_config(data_config, image_shape) -> augment.Augmentation:
    """The checked `data.augment` choice for the pipeline's `image_shape` (H, W, C). A config
    without the field (a run written before it existed) gets "cifar", the only choice then."""
    name = sources.config_value(data_config, "augment", "cifar")
    augmentation = augment.Augmentation(
        name=name,
        flip=bool(sources.config_value(data_config, "flip", False)),
        crop_padding=int(sources.config_value(data_config, "crop_padding", 0)),
        size=int(image_shape[0]),
    )
    if augmentation.needs_native_images and image_shape[0] != image_shape[1]:
        raise ValueError(
            f"data.augment={name!r} makes square crops of {image_shape[0]}x{image_shape[1]} "
            "images; allowed: square images, or data.augment=cifar or none"
        )
    return augmentation


def _read_source(source, augmentation: augment.Augmentation):
    if augmentation.needs_native_images and isinstance(source, local_sources.ImageFolderSource):
        return _NativeImageFolder(source)
    return source


def worker_count(data_config) -> int:
    """`data.worker_count` as a number: "auto" is 0 on a CPU-only host, else one worker per
    core but one (at most MAX_AUTO_WORKERS). Only sources read example by example use them."""
    value = sources.config_value(data_config, "worker_count", 0)
    if isinstance(value, str) and value.strip().lower() == "auto":
        if platform.running_on_cpu_only():
            return 0
        return max(1, min(MAX_AUTO_WORKERS, (os.cpu_count() or 2) - 1))
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = -1
    if count < 0 or isinstance(value, bool) or (isinstance(value, float) and value != count):
        raise ValueError(f"data.worker_count={value!r} is not a worker count; allowed: "
                         "'auto' or a number >= 0")
    return count


def _to_iterator(dataset: grain.MapDataset, workers: int):
    read_options = grain.ReadOptions(
        num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_BATCHES
    )
    iter_dataset = dataset.to_iter_dataset(read_options)
    if workers > 0:
        # Grain reads its own absl flags when it starts workers; a program that never ran
        # absl.app (a script, a test) has not parsed them, so take their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers)
        )
    return iter(iter_dataset)


def make_train_iterator(
    data_config,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    stats=None,
):
    """Endless iterator of this process's training batches from global step `start_step` on.

    Batches are `{"image": uint8 [B, H, W, C], "label": int32 [B], "position": int32 [B, 2]}`
    with B = global_batch_size / process_count; `augment.device_view` (in the step) augments
    and normalises them. `stats`: the run's recorded (mean, std), so that the data set's
    description is not measured again; measured on the training split when None.
    """
    process_index, _, local_batch = process_layout(global_batch_size, process_index, process_count)
    if start_step < 0:
        raise ValueError(f"start_step {start_step} must be >= 0")
    workers = worker_count(data_config)
    train_source = sources.load_source(data_config, "train")
    test_source = sources.load_source(data_config, "test")
    dataset_info = info.info_from_sources(data_config, train_source, test_source, stats)
    augmentation = augmentation_from_config(data_config, dataset_info.image_shape)
    order = _EpochOrder(len(train_source), seed=seed,
                        steps_in_epoch=steps_per_epoch(dataset_info, global_batch_size),
                        global_batch=global_batch_size, local_batch=local_batch,
                        process_index=process_index)
    arrays = None if augmentation.needs_native_images else sources.as_arrays(train_source)
    if arrays is not None:
        return _ArrayTrainBatches(*arrays, order, start_step)
    reader = _TrainExampleReader(_read_source(train_source, augmentation), order, augmentation)
    dataset = (
        grain.MapDataset.range(start_step * local_batch, sys.maxsize)
        .map(reader)
        .batch(local_batch, drop_remainder=True)
    )
    return _to_iterator(dataset, workers)


def make_eval_iterator(
    data_config,
    *,
    global_batch_size: int,
    split: str = "test",
    process_index: int | None = None,
    process_count: int | None = None,
    stats=None,
):
    """One in-order pass over `split`, as this process's uint8 batches, without random
    augmentation (with data.augment=imagenet: the resize and centre crop);
    `augment.device_view` normalises them in the step.

    Batches are `{"image", "label", "mask"}`; the last global batch is padded to full size
    with mask 0, so over all processes every example has mask 1 exactly once.
    """
    process_index, _, local_batch = process_layout(global_batch_size, process_index, process_count)
    workers = worker_count(data_config)
    train_source = sources.load_source(data_config, "train")
    split_source = train_source if split == "train" else sources.load_source(data_config, split)
    test_source = split_source if split == "test" else sources.load_source(data_config, "test")
    dataset_info = info.info_from_sources(data_config, train_source, test_source, stats)
    num_steps = -(-len(split_source) // global_batch_size)
    augmentation = augmentation_from_config(data_config, dataset_info.image_shape)
    arrays = None if augmentation.needs_native_images else sources.as_arrays(split_source)
    if arrays is not None:
        return _array_eval_batches(*arrays, num_steps=num_steps, global_batch=global_batch_size,
                                   local_batch=local_batch, process_index=process_index)
    reader = _EvalExampleReader(
        _read_source(split_source, augmentation),
        image_shape=dataset_info.image_shape,
        global_batch=global_batch_size,
        local_batch=local_batch,
        process_index=process_index,
        augmentation=augmentation,
    )
    dataset = (
        grain.MapDataset.range(num_steps * local_batch)
        .map(reader)
        .batch(local_batch, drop_remainder=True)
    )
    return _to_iterator(dataset, workers)
