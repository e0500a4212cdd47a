"""Sources that need no TFDS: the user's npz arrays, an image folder, synthetic data.

Each is a random-access sequence of `{"image": uint8 HxWxC, "label": int}`.
"""

from __future__ import annotations

import functools
import os
import zipfile

import numpy as np
from PIL import Image

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SYNTHETIC_DATA_SEED = 1_234  # fixed: the synthetic data set does not change with config.seed
SYNTHETIC_DEFAULTS = {"image_size": 32, "num_classes": 10, "num_train": 1024, "num_test": 256}


class NpzSource:
    """One split of the user's npz arrays (validated by `load_npz_arrays`).

    The classes are `num_classes` (data.num_classes) when given, else those of y_train
    (0..max): every label of both splits must lie in 0..num_classes-1, and an inferred
    count must have every class in y_train, so a stray label (999) is an error instead of a
    1000-way classifier.
    """

    def __init__(self, path: str, split: str, num_classes: int = 0):
        path = os.path.abspath(path)
        arrays = load_npz_arrays(path)
        self.images = arrays[f"x_{split}"]
        self.labels = arrays[f"y_{split}"]
        self.num_classes = npz_num_classes(path, arrays, num_classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": int(self.labels[index])}


def _check_npz_images(key: str, images: np.ndarray) -> np.ndarray:
    if images.dtype != np.uint8:
        raise ValueError(f"npz key {key!r} has dtype {images.dtype}; allowed: uint8 (0..255)")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or 0 in images.shape[1:]:
        raise ValueError(
            f"npz key {key!r} has shape {images.shape}; allowed: N x H x W or N x H x W x C "
            "with C in (1, 3)"
        )
    return images


def _check_npz_labels(key: str, labels: np.ndarray, num_images: int) -> np.ndarray:
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise ValueError(
            f"npz key {key!r} has dtype {labels.dtype} and shape {labels.shape}; allowed: "
            "a 1-D integer array"
        )
    if len(labels) != num_images or num_images == 0:
        raise ValueError(
            f"npz key {key!r} has {len(labels)} labels for {num_images} images; allowed: "
            "one label per image, at least one image"
        )
    if labels.min() < 0:
        raise ValueError(f"npz key {key!r} has label {labels.min()}; allowed: 0..num_classes-1")
    return labels


def npz_num_classes(path: str, arrays: dict, num_classes: int = 0) -> int:
    """The class count of an npz data set, with every label checked against it."""
    if num_classes < 0:
        raise ValueError(f"data.num_classes={num_classes} is negative; allowed: 0 (the classes "
                         "of y_train) or the number of classes")
    count = num_classes or int(arrays["y_train"].max()) + 1
    for key in ("y_train", "y_test"):
        labels = arrays[key]
        if labels.max() >= count:
            source = (f"data.num_classes={num_classes}" if num_classes else
                      f"y_train's classes 0..{count - 1}")
            raise ValueError(
                f"npz file {path}: key {key!r} has label {int(labels.max())}; allowed: "
                f"0..{count - 1} ({source}; set data.num_classes if there are more)")
    if not num_classes:
        present = np.unique(arrays["y_train"])
        if len(present) != count:
            missing = sorted(set(range(count)) - set(present.tolist()))
            raise ValueError(
                f"npz file {path}: y_train has {len(present)} distinct labels but its largest "
                f"is {count - 1} (class {missing[0]} never occurs); allowed: labels 0..C-1 with "
                "every class present, or data.num_classes set to the number of classes")
    return count


@functools.lru_cache(maxsize=4)
def _load_npz_cached(path: str, modified_ns: int) -> dict[str, np.ndarray]:
    del modified_ns  # part of the cache key only: a rewritten file is loaded again
    try:
        with np.load(path, allow_pickle=False) as npz_file:
            missing = [key for key in NPZ_KEYS if key not in npz_file.files]
            if missing:
                raise ValueError(
                    f"npz file {path} lacks key {missing[0]!r}; it needs keys {NPZ_KEYS} "
                    f"(found {tuple(npz_file.files)})"
                )
            arrays = {key: npz_file[key] for key in NPZ_KEYS}
    except ValueError as error:
        if str(error).startswith("npz file"):
            raise
        raise _unreadable_npz(path, error) from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise _unreadable_npz(path, error) from None
    for split in ("train", "test"):
        images = _check_npz_images(f"x_{split}", arrays[f"x_{split}"])
        arrays[f"x_{split}"] = images
        _check_npz_labels(f"y_{split}", arrays[f"y_{split}"], len(images))
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(
            f"npz key 'x_test' has images of shape {arrays['x_test'].shape[1:]}; allowed: "
            f"the shape of x_train's images, {arrays['x_train'].shape[1:]}"
        )
    return arrays


def _unreadable_npz(path: str, error: BaseException) -> ValueError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ValueError(f"npz file {path} cannot be read ({reason}); allowed: a complete file "
                      f"written by numpy.savez with keys {', '.join(NPZ_KEYS)}")


def load_npz_arrays(path: str) -> dict[str, np.ndarray]:
    """Loads and validates the npz file; images come back N x H x W x C."""
    if not path or not os.path.isfile(path):
        raise ValueError(f"data.path={path!r} is not an npz file (data.name='npz')")
    return _load_npz_cached(path, os.stat(path).st_mtime_ns)


def _image_files(class_dir: str) -> list[str]:
    return sorted(
        os.path.join(class_dir, file_name)
        for file_name in os.listdir(class_dir)
        if file_name.lower().endswith(IMAGE_SUFFIXES)
    )


def _class_names(split_dir: str) -> list[str]:
    return sorted(
        entry for entry in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, entry))
    )


def image_folder_split_dir(root: str, split: str) -> str:
    """`root/train`, or `root/test` (else `root/val`) for the test split."""
    candidates = ("train",) if split == "train" else ("test", "val")
    for folder in candidates:
        split_dir = os.path.join(root, folder)
        if os.path.isdir(split_dir):
            return split_dir
    wanted = " or ".join(os.path.join(root, folder) for folder in candidates)
    raise ValueError(f"image folder {wanted!r} not found (data.name='image_folder')")


class ImageFolderSource:
    """`root/<split>/<class_name>/*.png|jpg|jpeg`, classes sorted by name, decoded as RGB.

    Images are resized to `image_size` x `image_size`; with image_size 0, to the size of the
    first training image.
    """

    def __init__(self, root: str, split: str, image_size: int = 0):
        train_dir = image_folder_split_dir(root, "train")
        self.class_names = _class_names(train_dir)
        split_dir = image_folder_split_dir(root, split)
        class_index = {name: index for index, name in enumerate(self.class_names)}
        self.files: list[str] = []
        self.labels: list[int] = []
        for class_name in _class_names(split_dir):
            if class_name not in class_index:
                raise ValueError(f"class folder {split_dir}/{class_name} is not in {train_dir}")
            class_files = _image_files(os.path.join(split_dir, class_name))
            self.files += class_files
            self.labels += [class_index[class_name]] * len(class_files)
        if not self.files:
            raise ValueError(f"image folder {split_dir!r} has no class folders of png/jpg images")
        for path in self.files:  # headers only: a non-image file is named now, not mid-run
            _check_image_file(path)
        self.num_classes = len(self.class_names)
        self.image_size = image_size or _first_image_size(train_dir, self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        try:
            with Image.open(self.files[index]) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt pixels
            raise ValueError(_unreadable_image(self.files[index], error)) from None
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        return {"image": np.asarray(image, dtype=np.uint8), "label": self.labels[index]}


def _unreadable_image(path: str, error: BaseException) -> str:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (f"image file {path} cannot be read ({reason}); allowed: png or jpeg images "
            "(remove or replace the file)")


def _check_image_file(path: str) -> None:
    try:
        with Image.open(path) as opened:
            opened.size  # noqa: B018 - the header is parsed on open; size proves it
    except (OSError, ValueError, SyntaxError) as error:
        raise ValueError(_unreadable_image(path, error)) from None


def _first_image_size(train_dir: str, class_names: list[str]) -> int:
    for class_name in class_names:
        class_files = _image_files(os.path.join(train_dir, class_name))
        if class_files:
            with Image.open(class_files[0]) as opened:
                width, height = opened.size
            if width != height:
                raise ValueError(
                    f"image {class_files[0]} is {width}x{height}; set data.image_size to "
                    "resize the folder's images to a square size"
                )
            return width
    raise ValueError(f"image folder {train_dir!r} has no class folders of png/jpg images")


class SyntheticSource:
    """Random uint8 images and labels, each generated on demand from (split, index)."""

    def __init__(self, split: str, *, image_size: int, num_classes: int, num_examples: int):
        self.split_id = 0 if split == "train" else 1
        self.image_shape = (image_size, image_size, 3)
        self.num_classes = num_classes
        self.num_examples = num_examples

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        rng = np.random.default_rng([SYNTHETIC_DATA_SEED, self.split_id, int(index)])
        image = rng.integers(0, 256, size=self.image_shape, dtype=np.uint8)
        return {"image": image, "label": int(rng.integers(self.num_classes))}
