"""Random-access sources over TFDS data sets stored as array_record (`tfds.data_source`)."""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from cliquejax.data import digits_builder

TFDS_NAMES = ("cifar10", "cifar100", "svhn_cropped", "mnist")
_RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


class DatasetNotFoundError(ValueError):
    """A data set is not prepared where the config says it is (and is never downloaded)."""


class TfdsExampleSource:
    """Wraps a TFDS data source so items are `{"image": uint8 HxWxC, "label": int}`."""

    def __init__(self, data_source, *, name: str, split: str):
        self._data_source = data_source
        self.name = name
        self.split = split
        tfds_info = data_source.dataset_info
        self.num_classes = int(tfds_info.features["label"].num_classes)
        self.version = str(tfds_info.version)
        self.stats_cache_key = f"{name}-{self.version}-{split}-{len(data_source)}"

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, index: int) -> dict:
        try:
            example = self._data_source[int(index)]
        except IndexError:
            raise
        except Exception as error:  # noqa: BLE001 - array_record raises RuntimeError & co.
            raise self._damaged(error) from None
        image = np.asarray(example["image"], dtype=np.uint8)
        if image.ndim == 2:
            image = image[:, :, None]
        return {"image": image, "label": int(example["label"])}

    def _damaged(self, error: BaseException) -> ValueError:
        directory = str(self._data_source.dataset_info.data_dir)
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        again = ("it is rebuilt from scikit-learn on the next run" if self.name == "digits"
                 else prepare_command(self.name, os.path.dirname(os.path.dirname(directory))))
        return ValueError(f"data set {self.name!r} ({self.split}) cannot be read from "
                          f"{directory} ({reason}); its files are damaged: delete {directory} "
                          f"and prepare it again ({again})")

    def __repr__(self) -> str:
        return f"TfdsExampleSource({self.name!r}, split={self.split!r}, len={len(self)})"


def prepare_command(name: str, data_dir: str) -> str:
    """How to produce `name` in array_record format under `data_dir` (one line)."""
    target = os.path.abspath(data_dir)
    packages = "tensorflow tensorflow-datasets" + (" scipy" if name == "svhn_cropped" else "")
    return (
        f"on a machine with network access run `pip install {packages} && tfds build {name} "
        f"--data_dir={target} --file_format=array_record` (if built elsewhere, copy "
        f"{target}/{name} to the same place here)"
    )


def _not_prepared_error(name: str, data_dir: str) -> DatasetNotFoundError | None:
    """Why `name` cannot be opened from `data_dir`, or None when the cause is elsewhere."""
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        return DatasetNotFoundError(
            f"data set {name!r} is not prepared under data_dir={data_dir!r} and cannot be "
            f"downloaded here: {prepare_command(name, data_dir)}"
        )
    file_format = builder.info.file_format.value
    if file_format not in _RANDOM_ACCESS_FORMATS:
        return DatasetNotFoundError(
            f"data set {name!r} under data_dir={data_dir!r} is in {file_format} format, which "
            f"has no random access; convert it with `tfds convert_format "
            f"--dataset_dir={os.path.abspath(builder.data_path.parent)} "
            f"--out_file_format=array_record` (needs tensorflow) or rebuild it: "
            f"{prepare_command(name, data_dir)}"
        )
    return None


def _open_data_source(tfds_name: str, split: str, data_dir: str):
    try:
        return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception:
        diagnosis = _not_prepared_error(tfds_name, data_dir)
        if diagnosis is None:
            raise
        raise diagnosis from None


def open_tfds_source(name: str, split: str, data_dir: str, *, svhn_extra: bool = False):
    """Opens split 'train' or 'test' of a TFDS data set, or of the project's digits.

    `svhn_extra` makes svhn_cropped's train split TFDS's 'train+extra'.
    """
    if name == "digits":
        digits_builder.ensure_digits_prepared(data_dir)
        tfds_name = digits_builder.DIGITS_NAME
    elif name in TFDS_NAMES:
        tfds_name = name
    else:
        raise ValueError(f"data.name={name!r} is not a TFDS data set; allowed: {TFDS_NAMES}")
    with_extra = name == "svhn_cropped" and svhn_extra and split == "train"
    tfds_split = "train+extra" if with_extra else split
    data_source = _open_data_source(tfds_name, tfds_split, data_dir)
    return TfdsExampleSource(data_source, name=name, split=tfds_split)
