"""scikit-learn's bundled 8x8 digits as a TFDS data set, built offline as array_record.

The 1,797 images are split once by a fixed-seed permutation into 1,437 train and 360 test
examples (the last 360 of the permutation are the test set), so every machine builds the
same split. Pixel values 0..16 are scaled to uint8 0..255.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

DIGITS_NAME = "cliquejax_digits"
DIGITS_NUM_TEST = 360
DIGITS_SPLIT_SEED = 20_240_601
_SKLEARN_MAX_VALUE = 16


def digits_split_indices() -> dict[str, np.ndarray]:
    """Indices into `sklearn.datasets.load_digits()` for each split (sorted within a split)."""
    from sklearn.datasets import load_digits

    num_images = len(load_digits().target)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(num_images)
    return {
        "train": np.sort(order[:-DIGITS_NUM_TEST]),
        "test": np.sort(order[-DIGITS_NUM_TEST:]),
    }


class CliquejaxDigits(tfds.core.GeneratorBasedBuilder):
    """sklearn digits, 8x8x1 uint8, labels 0..9; needs no download."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "1437 train / 360 test by a fixed-seed permutation."}

    def _info(self) -> tfds.core.DatasetInfo:
        # Tensor rather than Image: encoding a numpy Image feature needs TensorFlow, and
        # raw 8x8 bytes are smaller and faster to read than PNG.
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
        )
        return self.dataset_info_from_configs(
            features=features,
            supervised_keys=("image", "label"),
            description="scikit-learn's 8x8 handwritten digits (UCI), scaled to 0..255.",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {
            split: self._generate_examples(indices)
            for split, indices in digits_split_indices().items()
        }

    def _generate_examples(self, indices: np.ndarray) -> Iterator[tuple[int, dict]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        scaled = np.rint(digits.images * (255.0 / _SKLEARN_MAX_VALUE)).astype(np.uint8)
        for index in indices:
            example = {"image": scaled[index][:, :, None], "label": int(digits.target[index])}
            yield int(index), example


@contextlib.contextmanager
def _exclusive_lock(lock_path: str) -> Iterator[None]:
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _is_prepared(data_dir: str) -> bool:
    # TFDS writes into a temporary folder and renames it when done, so the info file is
    # there only once the whole data set is.
    version_dir = os.path.join(data_dir, DIGITS_NAME, str(CliquejaxDigits.VERSION))
    return os.path.isfile(os.path.join(version_dir, "dataset_info.json"))


def ensure_digits_prepared(data_dir: str) -> None:
    """Builds the digits data set into `data_dir` unless it is there already.

    Safe when several processes call it at once: they serialise on a lock file, and the
    ones that come second find the finished data set and reuse it.
    """
    if _is_prepared(data_dir):
        return
    os.makedirs(data_dir, exist_ok=True)
    with _exclusive_lock(os.path.join(data_dir, f".{DIGITS_NAME}.lock")):
        if not _is_prepared(data_dir):
            builder = CliquejaxDigits(data_dir=data_dir, file_format="array_record")
            builder.download_and_prepare(file_format="array_record")
