"""Deterministic, resumable, multi-host grain pipelines for training and evaluation.

Train order: epoch e visits the training examples in `permutation(seed, e)`; global step s
of the epoch takes positions s*G .. s*G+G-1 of it (G: global batch), and process p takes
the p-th contiguous slice of B = G / process_count positions. Augmentation of the example
at position q of epoch e draws from a generator seeded by (seed, e, q) only. So a batch is
a pure function of (seed, global step, process layout), the union over processes equals
the one-process batch, and starting at any step needs no replay.

`config.data.augment` (cifar | imagenet | none, see `augment`) picks the training
augmentation and the evaluation view. The "imagenet" crops read an image folder's images
at their own size; every other choice reads them as the source gives them.
"""

from __future__ import annotations

import sys

import grain
import jax
import numpy as np
from absl import flags

from cliquejax.data import augment, info, local_sources, sources

_PERMUTATION_STREAM = 0
_AUGMENTATION_STREAM = 1
READ_THREADS = 1  # measured: more threads only contend for the GIL on these small examples
PREFETCH_BATCHES = 8


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


class _TrainExampleReader:
    """Maps a per-process element number to its augmented training example."""

    def __init__(
        self,
        source,
        *,
        seed,
        steps_in_epoch,
        global_batch,
        local_batch,
        process_index,
        augmentation,
    ):
        self.source = source
        self.seed = seed
        self.steps_in_epoch = steps_in_epoch
        self.global_batch = global_batch
        self.local_batch = local_batch
        self.process_index = process_index
        self.augmentation = augmentation
        self._permutations: dict[int, np.ndarray] = {}

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        permutation = self._permutations.get(epoch)
        if permutation is None:
            rng = np.random.default_rng([self.seed, _PERMUTATION_STREAM, epoch])
            permutation = rng.permutation(len(self.source))
            self._permutations[epoch] = permutation
            # Prefetching threads may still be finishing the previous epoch.
            self._permutations.pop(epoch - 2, None)
        return permutation

    def epoch_and_position(self, element: int) -> tuple[int, int]:
        step, slot = divmod(element, self.local_batch)
        epoch, step_in_epoch = divmod(step, self.steps_in_epoch)
        position = step_in_epoch * self.global_batch + self.process_index * self.local_batch
        return epoch, position + slot

    def __call__(self, element: int) -> dict:
        epoch, position = self.epoch_and_position(int(element))
        example = self.source[int(self.epoch_permutation(epoch)[position])]
        rng = np.random.default_rng([self.seed, _AUGMENTATION_STREAM, epoch, position])
        image = self.augmentation.train(example["image"], rng)
        return {"image": image, "label": np.int32(example["label"])}


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


class _Normalizer:
    """uint8 image batch -> float32 (x - mean) / std per channel."""

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, np.float32)
        self.inverse_std = np.float32(1.0) / np.asarray(std, np.float32)

    def __call__(self, batch: dict) -> dict:
        image = (batch["image"].astype(np.float32) - self.mean) * self.inverse_std
        return {**batch, "image": image}


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


def _to_iterator(dataset: grain.MapDataset, worker_count: int):
    read_options = grain.ReadOptions(
        num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_BATCHES
    )
    iter_dataset = dataset.to_iter_dataset(read_options)
    if worker_count > 0:
        # Grain reads its own absl flags when it starts workers; a program that never ran
        # absl.app (a script, a test) has not parsed them, so take their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count)
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

    Batches are `{"image": float32 [B, H, W, C] normalised, "label": int32 [B]}` with
    B = global_batch_size / process_count. `stats`: the (mean, std) to normalise with (a
    run's recorded ones); measured on the training split when None.
    """
    process_index, _, local_batch = process_layout(global_batch_size, process_index, process_count)
    if start_step < 0:
        raise ValueError(f"start_step {start_step} must be >= 0")
    train_source = sources.load_source(data_config, "train")
    test_source = sources.load_source(data_config, "test")
    dataset_info = info.info_from_sources(data_config, train_source, test_source, stats)
    augmentation = augmentation_from_config(data_config, dataset_info.image_shape)
    reader = _TrainExampleReader(
        _read_source(train_source, augmentation),
        seed=seed,
        steps_in_epoch=steps_per_epoch(dataset_info, global_batch_size),
        global_batch=global_batch_size,
        local_batch=local_batch,
        process_index=process_index,
        augmentation=augmentation,
    )
    dataset = (
        grain.MapDataset.range(start_step * local_batch, sys.maxsize)
        .map(reader)
        .batch(local_batch, drop_remainder=True)
        .map(_Normalizer(dataset_info.mean, dataset_info.std))
    )
    return _to_iterator(dataset, int(sources.config_value(data_config, "worker_count", 0)))


def make_eval_iterator(
    data_config,
    *,
    global_batch_size: int,
    split: str = "test",
    process_index: int | None = None,
    process_count: int | None = None,
    stats=None,
):
    """One in-order pass over `split`, as this process's batches, without random
    augmentation (with data.augment=imagenet: the resize and centre crop).

    Batches are `{"image", "label", "mask"}`; the last global batch is padded to full size
    with mask 0, so over all processes every example has mask 1 exactly once.
    """
    process_index, _, local_batch = process_layout(global_batch_size, process_index, process_count)
    train_source = sources.load_source(data_config, "train")
    split_source = train_source if split == "train" else sources.load_source(data_config, split)
    test_source = split_source if split == "test" else sources.load_source(data_config, "test")
    dataset_info = info.info_from_sources(data_config, train_source, test_source, stats)
    num_steps = -(-len(split_source) // global_batch_size)
    augmentation = augmentation_from_config(data_config, dataset_info.image_shape)
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
        .map(_Normalizer(dataset_info.mean, dataset_info.std))
    )
    return _to_iterator(dataset, int(sources.config_value(data_config, "worker_count", 0)))
