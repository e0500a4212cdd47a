"""`dataset_info(data_config)`: shapes, sizes and per-channel normalisation statistics.

Mean and std are measured on the training split (every example, or an evenly spaced sample
of at most `MAX_STATS_EXAMPLES`; 2,000 for image folders, whose images are decoded and
resized one by one), on the 0..255 scale. They are kept in memory, and for TFDS data sets
also in `<data_dir>/cliquejax_stats/<name>-<version>-<split>-<size>.json`, so each data set
is measured once.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from cliquejax.data import sources, tfds_sources

MAX_STATS_EXAMPLES = 60_000
MAX_IMAGE_FOLDER_STATS_EXAMPLES = 2_000
_STATS_CHUNK = 1_024
_stats_in_memory: dict[tuple, tuple[tuple[float, ...], tuple[float, ...]]] = {}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    image_shape: tuple[int, int, int]  # (H, W, C) as the pipelines yield it
    num_classes: int
    num_train: int
    num_test: int
    mean: tuple[float, ...]  # per channel, 0..255 scale, of the training split
    std: tuple[float, ...]


def channel_stats(source, max_examples: int = MAX_STATS_EXAMPLES):
    """Per-channel (mean, std) of `source`'s images, over at most `max_examples` of them."""
    num_used = min(len(source), max_examples)
    indices = np.unique(np.linspace(0, len(source) - 1, num_used).round().astype(np.int64))
    pixel_sum = pixel_square_sum = 0.0
    pixel_count = 0
    for chunk_start in range(0, len(indices), _STATS_CHUNK):
        chunk = indices[chunk_start : chunk_start + _STATS_CHUNK]
        images = np.stack([source[int(i)]["image"] for i in chunk]).astype(np.float64)
        pixels = images.reshape(-1, images.shape[-1])
        pixel_sum = pixel_sum + pixels.sum(axis=0)
        pixel_square_sum = pixel_square_sum + np.square(pixels).sum(axis=0)
        pixel_count += len(pixels)
    mean = pixel_sum / pixel_count
    variance = np.maximum(pixel_square_sum / pixel_count - np.square(mean), 0.0)
    # A constant channel would divide by zero when normalising.
    std = np.maximum(np.sqrt(variance), 1e-3)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _stats_file(data_dir: str, cache_key: str) -> str:
    return os.path.join(data_dir, "cliquejax_stats", f"{cache_key}.json")


def _read_stats_file(path: str):
    try:
        with open(path) as stats_file:
            stored = json.load(stats_file)
        return tuple(stored["mean"]), tuple(stored["std"])
    except (OSError, ValueError, KeyError):
        return None


def _write_stats_file(path: str, mean, std) -> None:
    temporary_path = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(temporary_path, "w") as stats_file:
            json.dump({"mean": list(mean), "std": list(std)}, stats_file)
        os.replace(temporary_path, path)
    except OSError:
        pass  # a read-only data_dir: the statistics stay in memory only


def _memory_key(data_config, source) -> tuple:
    path = sources.data_path(data_config)
    modified_ns = os.stat(path).st_mtime_ns if path and os.path.exists(path) else 0
    fields = ("name", "data_dir", "image_size", "num_classes", "num_train", "svhn_extra")
    values = tuple(sources.config_value(data_config, field) for field in fields)
    return (*values, os.path.abspath(path) if path else "", modified_ns, len(source))


def training_stats(data_config, train_source):
    """(mean, std) of the training split, measured once and cached."""
    memory_key = _memory_key(data_config, train_source)
    if memory_key in _stats_in_memory:
        return _stats_in_memory[memory_key]
    stats_path = None
    if isinstance(train_source, tfds_sources.TfdsExampleSource):
        stats_path = _stats_file(sources.data_dir(data_config), train_source.stats_cache_key)
        stats = _read_stats_file(stats_path)
    else:
        stats = None
    if stats is None:
        is_folder = sources.config_value(data_config, "name") == "image_folder"
        max_examples = MAX_IMAGE_FOLDER_STATS_EXAMPLES if is_folder else MAX_STATS_EXAMPLES
        stats = channel_stats(train_source, max_examples)
        if stats_path:
            _write_stats_file(stats_path, *stats)
    _stats_in_memory[memory_key] = stats
    return stats


def info_from_sources(data_config, train_source, test_source, stats=None) -> DatasetInfo:
    """The `DatasetInfo` of already opened train and test sources; `stats` (mean, std): a
    run's recorded normalisation (`run_dir.normalization`), measured when None."""
    mean, std = stats if stats is not None else training_stats(data_config, train_source)
    image_shape = tuple(int(size) for size in train_source[0]["image"].shape)
    return DatasetInfo(
        name=sources.config_value(data_config, "name"),
        image_shape=image_shape,
        num_classes=int(train_source.num_classes),
        num_train=len(train_source),
        num_test=len(test_source),
        mean=mean,
        std=std,
    )


def fingerprint(train_source, test_source) -> dict:
    """What was read, split by split (each source's `fingerprint()`: an npz file's size and
    sha256, an image folder's files by name and content, a TFDS split's name, version and
    size): recorded with a run, so a change to the data after training is found."""
    return {"train": train_source.fingerprint(), "test": test_source.fingerprint()}


def label_names(train_source) -> list[str] | None:
    """The data set's class names when it has them (image folders, TFDS ClassLabels); None
    when they are only the numbers 0..C-1."""
    names = getattr(train_source, "class_names", None)
    if names is None and hasattr(train_source, "_data_source"):
        names = train_source._data_source.dataset_info.features["label"].names
    if names is None:
        return None
    names = [str(name) for name in names]
    return None if names == [str(i) for i in range(len(names))] else names


def dataset_info(data_config) -> DatasetInfo:
    """Opens both splits of the configured data set and describes it."""
    return info_from_sources(
        data_config,
        sources.load_source(data_config, "train"),
        sources.load_source(data_config, "test"),
    )
