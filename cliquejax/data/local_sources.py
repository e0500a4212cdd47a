"""Sources that need no TFDS: the user's npz arrays, an image folder, synthetic data.

Each is a random-access sequence of `{"image": uint8 HxWxC, "label": int}`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
import zipfile

import numpy as np
from PIL import Image

from cliquejax import cli

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SYNTHETIC_DATA_SEED = 1_234  # fixed: the synthetic data set does not change with config.seed
SYNTHETIC_DEFAULTS = {"image_size": 32, "num_classes": 10, "num_train": 1024, "num_test": 256}


class NpzSource:
    """One split of the user's npz arrays (validated by `load_npz_arrays`).

    The classes are `num_classes` (data.num_classes) when given, else those of y_train
    (0..max): every label of both splits must lie in 0..num_classes-1, and every class must
    have training images, so a stray label (999) is an error instead of a 1000-way
    classifier.
    """

    def __init__(self, path: str, split: str, num_classes: int = 0):
        path = os.path.abspath(path)
        arrays = load_npz_arrays(path)
        self.images = arrays[f"x_{split}"]
        self.labels = arrays[f"y_{split}"]
        self.num_classes = npz_num_classes(path, arrays, num_classes)
        self.path = path

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> dict:
        """The file's size and content hash (both splits live in it)."""
        stat = os.stat(self.path)
        return {"file": self.path, "bytes": stat.st_size,
                "sha256": _file_sha256(self.path, stat.st_size, stat.st_mtime_ns)}

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
    if len(np.unique(arrays["y_train"])) < 2:  # every prediction right: 100% meaning nothing
        raise ValueError(f"npz file {path}: y_train holds one class (every label is "
                         f"{int(arrays['y_train'][0])}); allowed: labels of two or more classes")
    count = num_classes or int(arrays["y_train"].max()) + 1
    for key in ("y_train", "y_test"):
        labels = arrays[key]
        if labels.max() >= count:
            source = (f"data.num_classes={num_classes}" if num_classes else
                      f"y_train's classes 0..{count - 1}")
            raise ValueError(
                f"npz file {path}: key {key!r} has label {int(labels.max())}; allowed: "
                f"0..{count - 1} ({source}; set data.num_classes if there are more)")
    present = np.unique(arrays["y_train"])
    if len(present) != count:
        # a class without a training image: its logit is only ever pushed down. The first
        # gap of the sorted classes, found without a list of `count` numbers (a label of
        # 10**9 would make one of gigabytes)
        gaps = np.flatnonzero(present != np.arange(len(present)))
        missing = int(gaps[0]) if len(gaps) else len(present)
        source = (f"data.num_classes={num_classes}" if num_classes else
                  f"its largest label is {count - 1}")
        raise ValueError(
            f"npz file {path}: y_train has no image of class {missing} ({source}; "
            f"{len(present)} classes occur); allowed: labels 0..C-1 with every class present "
            "in y_train")
    return count


@functools.lru_cache(maxsize=4)
def _load_npz_cached(path: str, modified_ns: int) -> dict[str, np.ndarray]:
    del modified_ns  # part of the cache key only: a rewritten file is loaded again
    with open(path, "rb") as handle:
        start = handle.read(6)
    if not start.startswith((b"PK", b"\x93NUMPY")):  # numpy would take it for a pickle
        raise ValueError(f"npz file {path} is not an npz archive (it does not start as a zip "
                         "file does); allowed: a file written by numpy.savez with keys "
                         f"{', '.join(NPZ_KEYS)}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # one .npy array
            raise ValueError(f"npz file {path} is a single .npy array, not an .npz archive; "
                             f"allowed: numpy.savez(path, {'=..., '.join(NPZ_KEYS)}=...)")
        with loaded as npz_file:
            missing = [key for key in NPZ_KEYS if key not in npz_file.files]
            if missing:
                raise ValueError(
                    f"npz file {path} lacks key {missing[0]!r}; it needs keys {NPZ_KEYS} "
                    f"(found {tuple(npz_file.files)})"
                )
            arrays = {key: _npz_array(path, npz_file, key) for key in NPZ_KEYS}
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


def _npz_array(path: str, npz_file, key: str) -> np.ndarray:
    try:
        return npz_file[key]
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise
        # numpy.savez pickles what is not a plain numeric array (lists of strings, ragged
        # lists, None): the file is whole, the array is of the wrong kind.
        raise ValueError(f"npz file {path}: key {key!r} holds Python objects (numpy stored it "
                         "pickled); allowed: numeric arrays, uint8 images and integer "
                         "labels") from None


@functools.lru_cache(maxsize=4)
def _file_sha256(path: str, size: int, modified_ns: int) -> str:
    del size, modified_ns  # the cache key: a rewritten file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unreadable_npz(path: str, error: BaseException) -> ValueError:
    reason = cli.first_line(error)
    return ValueError(f"npz file {path} cannot be read ({reason}); allowed: a complete file "
                      f"written by numpy.savez with keys {', '.join(NPZ_KEYS)}")


def load_npz_arrays(path: str) -> dict[str, np.ndarray]:
    """Loads and validates the npz file; images come back N x H x W x C."""
    if not path or not os.path.isfile(path):
        raise ValueError(f"data.path={path!r} is not an npz file (data.name='npz')")
    return _load_npz_cached(path, os.stat(path).st_mtime_ns)


def _visible(directory: str) -> list[str]:
    """The entries of `directory` that are not hidden (.DS_Store, ._x.png, .ipynb_checkpoints:
    what file managers and notebooks leave behind), sorted."""
    return sorted(name for name in os.listdir(directory) if not name.startswith("."))


def _image_files(class_dir: str) -> list[str]:
    """The image files of one class folder; any other visible entry is refused by name (a
    file dropped without a word would be a class with fewer, or no, images)."""
    files = []
    for name in _visible(class_dir):
        path = os.path.join(class_dir, name)
        if os.path.isdir(path):
            raise ValueError(f"{path} is a folder inside a class folder; allowed: the class's "
                             f"{'/'.join(IMAGE_SUFFIXES)} files directly in {class_dir}")
        if not name.lower().endswith(IMAGE_SUFFIXES):
            raise ValueError(f"{path} is not a {'/'.join(IMAGE_SUFFIXES)} image; allowed: only "
                             "images in class folders (remove or move the file; hidden files "
                             "are ignored)")
        files.append(path)
    return files


def _class_names(split_dir: str) -> list[str]:
    names = _visible(split_dir)
    for name in names:
        if not os.path.isdir(os.path.join(split_dir, name)):
            raise ValueError(f"{os.path.join(split_dir, name)} is a file where class folders are "
                             f"expected; allowed: only class folders in {split_dir} (hidden "
                             "entries are ignored)")
    return names


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
    """`root/<split>/<class_name>/*.png|jpg|jpeg`, classes sorted by name, decoded as RGB
    (`decode_image`). Hidden entries are ignored; anything else that is not a class folder of
    images is refused by name, as is a training class without images and (with
    `num_classes` > 0) a class count other than the config's.

    Images are resized to `image_size` x `image_size`; with image_size 0, to the size of the
    first training image.
    """

    def __init__(self, root: str, split: str, image_size: int = 0, num_classes: int = 0):
        train_dir = image_folder_split_dir(root, "train")
        self.root = os.path.abspath(root)
        self.class_names = _class_names(train_dir)
        if len(self.class_names) == 1:  # one class: every prediction right, meaning nothing
            raise ValueError(
                f"image folder {train_dir} has one class folder ({self.class_names[0]}); "
                "allowed: two or more class folders, one per class (train/<class>/*.png)")
        if num_classes and len(self.class_names) != num_classes:
            raise ValueError(
                f"image folder {train_dir} has {len(self.class_names)} class folders; the config "
                f"expects data.num_classes={num_classes}; allowed: a folder of {num_classes} "
                f"classes, or --config.data.num_classes={len(self.class_names)}")
        split_dir = image_folder_split_dir(root, split)
        class_index = {name: index for index, name in enumerate(self.class_names)}
        self.files: list[str] = []
        self.labels: list[int] = []
        for class_name in _class_names(split_dir):
            if class_name not in class_index:
                raise ValueError(f"class folder {split_dir}/{class_name} is not in {train_dir}")
            class_files = _image_files(os.path.join(split_dir, class_name))
            if not class_files and split == "train":
                raise ValueError(f"class folder {split_dir}/{class_name} holds no images; "
                                 "allowed: at least one png/jpg image in every training class")
            self.files += class_files
            self.labels += [class_index[class_name]] * len(class_files)
        if not self.files:
            raise ValueError(f"image folder {split_dir!r} has no class folders of png/jpg images")
        for path in self.files:  # headers only: a non-image file is named now, not mid-run
            check_image_file(path)
        self.split_dir = split_dir
        self.num_classes = len(self.class_names)
        self.image_size = image_size or _first_image_size(train_dir, self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        image = decode_image(self.files[index])
        if image.shape[:2] != (self.image_size, self.image_size):
            resized = Image.fromarray(image).resize((self.image_size, self.image_size),
                                                    Image.Resampling.BILINEAR)
            image = np.asarray(resized, dtype=np.uint8)
        return {"image": image, "label": self.labels[index]}

    def fingerprint(self) -> dict:
        """Every file of the split by name and content, hashed per class folder: the same
        bytes copied elsewhere (new modification times) are the same data, a file rewritten
        with other bytes is not. Reading the files is a fraction of an epoch (no decoding)."""
        by_class: dict[str, hashlib._Hash] = {}
        total = 0
        for path in self.files:
            relative = os.path.relpath(path, self.split_dir)
            digest = by_class.setdefault(os.path.dirname(relative), hashlib.sha256())
            with open(path, "rb") as handle:
                content = handle.read()
            total += len(content)
            digest.update(f"{os.path.basename(relative)}\0{len(content)}\0".encode())
            digest.update(hashlib.sha256(content).digest())
        return {"folder": self.split_dir, "files": len(self.files), "bytes": total,
                "content": {name: digest.hexdigest()[:16] for name, digest in by_class.items()}}


# Modes whose PIL conversion to L / RGB keeps the pixels' range (1: 0/255; P: its palette;
# alpha is dropped, the colour kept as stored). 16-bit grey (I;16*, and I as 16-bit PNGs
# may open) is scaled from 0..65535; other modes (F, float) have no known range.
_CONVERTIBLE_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                      "YCbCr")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _pixels(opened, channels: int, path: str) -> np.ndarray:
    mode = opened.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(opened)
        if values.size and (values.min() < 0 or values.max() > 65_535):
            raise ValueError(f"image file {path} has {mode} pixels {values.min()}..{values.max()}"
                             "; allowed: 8-bit or 16-bit (0..65535) images")
        grey = ((values.astype(np.uint32) * 255 + 32_767) // 65_535).astype(np.uint8)
        return np.repeat(grey[..., None], channels, axis=-1)
    if mode not in _CONVERTIBLE_MODES:
        raise ValueError(f"image file {path} has PIL mode {mode!r}; allowed: 1-, 8- or 16-bit "
                         f"images of modes {', '.join(_CONVERTIBLE_MODES + _SIXTEEN_BIT_MODES)}")
    converted = opened.convert("L" if channels == 1 else "RGB")
    return np.asarray(converted, dtype=np.uint8).reshape(opened.height, opened.width, channels)


def decode_image(path: str, channels: int = 3) -> np.ndarray:
    """uint8 H x W x `channels` (1: grey, 3: RGB) pixels of an image file in their real range,
    or one-line ValueError naming the file. Call `check_image_file` first: it refuses
    images over PIL's pixel limit (this runs in the loader's threads, where the warning
    filter cannot be changed safely)."""
    try:
        with Image.open(path) as opened:
            return _pixels(opened, channels, path)
    except ValueError as error:
        if str(error).startswith(f"image file {path} has"):
            raise
        raise ValueError(_unreadable_image(path, error)) from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(_unreadable_image(path, error)) from None


def _unreadable_image(path: str, error: BaseException) -> str:
    reason = cli.first_line(error)
    return (f"image file {path} cannot be read ({reason}); allowed: png or jpeg images "
            "(remove or replace the file)")


def check_image_file(path: str) -> None:
    """Parses the header of an image file; an image over PIL's pixel limit
    (`PIL.Image.MAX_IMAGE_PIXELS`, a guard against decompression bombs) is refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.size  # noqa: B018 - the header is parsed on open; size proves it
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ValueError(f"image file {path} has more pixels than PIL's limit of "
                         f"{Image.MAX_IMAGE_PIXELS:,}; allowed: smaller images (resize it "
                         "beforehand)") from None
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

    def fingerprint(self) -> dict:
        return {"synthetic": SYNTHETIC_DATA_SEED, "image_shape": list(self.image_shape),
                "num_classes": self.num_classes, "examples": self.num_examples}

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        rng = np.random.default_rng([SYNTHETIC_DATA_SEED, self.split_id, int(index)])
        image = rng.integers(0, 256, size=self.image_shape, dtype=np.uint8)
        return {"image": image, "label": int(rng.integers(self.num_classes))}
