"""Random-access sources over TFDS data sets stored as array_record (`tfds.data_source`)."""

from __future__ import annotations

import os
import re

import numpy as np
import tensorflow_datasets as tfds

from cliquejax import cli
from cliquejax.data import digits_builder

# The data sets the configs use; `data.name` may name any other TFDS image-classification
# data set prepared under `data.data_dir` (`open_tfds_source`).
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

    def fingerprint(self) -> dict:
        """Name, version and size of the split read (TFDS versions its data sets: a rebuilt
        or changed one gets another version or size)."""
        return {"tfds": self.name, "version": self.version, "split": self.split,
                "examples": len(self), "image_size": getattr(self, "image_size", 0)}

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
        reason = cli.first_line(error, 200)
        again = ("it is rebuilt from scikit-learn on the next run" if self.name == "digits"
                 else prepare_command(self.name, os.path.dirname(os.path.dirname(directory))))
        return ValueError(f"data set {self.name!r} ({self.split}) cannot be read from "
                          f"{directory} ({reason}); its files are damaged: delete {directory} "
                          f"and prepare it again ({again})")

    def __repr__(self) -> str:
        return f"TfdsExampleSource({self.name!r}, split={self.split!r}, len={len(self)})"


class ResizedTfdsSource(TfdsExampleSource):
    """A TFDS source whose images vary in size (imagenet2012), resized to `image_size` x
    `image_size` (bilinear, as image folders are)."""

    def __init__(self, data_source, *, name: str, split: str, image_size: int):
        super().__init__(data_source, name=name, split=split)
        self.image_size = image_size
        self.stats_cache_key += f"-{image_size}px"

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        example = super().__getitem__(index)
        image, size = example["image"], self.image_size
        if image.shape[:2] != (size, size):
            channels = image.shape[-1]
            resized = Image.fromarray(image[..., 0] if channels == 1 else image).resize(
                (size, size), Image.Resampling.BILINEAR)
            image = np.asarray(resized, dtype=np.uint8).reshape(size, size, channels)
        return dict(example, image=image)


def default_data_dir() -> str:
    """TFDS's own default directory ($TFDS_DATA_DIR when TFDS was imported, else
    ~/tensorflow_datasets)."""
    return tfds.core.constants.DATA_DIR


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
        where = "" if os.path.isabs(data_dir) else \
            f" (relative to the working directory: {os.path.abspath(data_dir)})"
        return DatasetNotFoundError(
            f"data set {name!r} is not prepared under data_dir={data_dir!r}{where} and cannot "
            f"be downloaded here: {prepare_command(name, data_dir)}"
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


def _resolve(name: str, split: str, data_dir: str) -> tuple[str, bool]:
    """(the TFDS split read for `split`, whether the images vary in size) of data set `name`.
    The 'test' split is 'validation' when there is no labelled 'test' split (imagenet2012).
    Checks that `name` is a TFDS data set (registered, or prepared under `data_dir`) of
    `image` and `label` (ClassLabel) features."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*(/[\w.]+)?", name):
        # TFDS would read a version (name:1.0) or a CamelCase name (Cifar10 is cifar10) on
        # its own terms, answering with its warnings and an AssertionError's traceback
        raise DatasetNotFoundError(
            f"data.name={name!r} is not a data set name; allowed: digits, npz, image_folder, "
            f"synthetic, or a TFDS data set's name as TFDS lists it (lower case, no version: "
            f"{', '.join(TFDS_NAMES)}, imagenet2012)")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise DatasetNotFoundError(
            f"data.name={name!r} is neither one of the project's sources nor a TFDS data set "
            f"(none of that name is registered or prepared under data_dir={data_dir!r}); "
            f"allowed: digits, npz, image_folder, synthetic, or a TFDS image-classification "
            f"data set such as {', '.join(TFDS_NAMES)}, imagenet2012") from None
    features = builder.info.features
    found = tuple(features.keys()) if features is not None else ()
    if "image" not in found or "label" not in found or \
            not isinstance(features["label"], tfds.features.ClassLabel):
        raise ValueError(f"data.name={name!r} has features ({', '.join(found)}); allowed: a "
                         f"data set with an 'image' feature and a 'label' ClassLabel feature")
    varying = None in tuple(features["image"].shape)[:2]
    splits = builder.info.splits.keys()
    if split == "test" and "test" not in splits and "validation" in splits:
        return "validation", varying
    return split, varying


def open_tfds_source(name: str, split: str, data_dir: str, *, svhn_extra: bool = False,
                     image_size: int = 0):
    """Opens split 'train' or 'test' of a TFDS data set, or of the project's digits.

    `name` is any TFDS image-classification data set prepared under `data_dir` in
    array_record format (e.g. cifar10, imagenet2012): a config change adds one. Images of
    varying size (imagenet2012) are resized to `image_size`, which they need. `svhn_extra`
    makes svhn_cropped's train split TFDS's 'train+extra'.
    """
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise ValueError(f"data.data_dir={data_dir!r} is a file; allowed: the directory that "
                         "holds (or will hold) the prepared TFDS data sets")
    if name == "digits":
        digits_builder.ensure_digits_prepared(data_dir)
        tfds_name = digits_builder.DIGITS_NAME
    else:
        tfds_name = name
    tfds_split, varying = _resolve(tfds_name, split, data_dir)
    if varying and not image_size:
        raise ValueError(f"data.name={name!r} has images of varying size and "
                         f"data.image_size=0; allowed: data.image_size > 0 (they are resized)")
    if name == "svhn_cropped" and svhn_extra and split == "train":
        tfds_split = "train+extra"
    data_source = _open_data_source(tfds_name, tfds_split, data_dir)
    if varying:
        return ResizedTfdsSource(data_source, name=name, split=tfds_split, image_size=image_size)
    return TfdsExampleSource(data_source, name=name, split=tfds_split)
