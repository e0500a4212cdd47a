"""`load_source(data_config, split)`: the random-access source that `config.data` names."""

from __future__ import annotations

import collections
import math
import os

import numpy as np

from cliquejax.data import augment, local_sources, tfds_sources

# Any other `data.name` is a TFDS data set prepared under `data.data_dir` (tfds_sources).
SOURCE_NAMES = ("digits", *tfds_sources.TFDS_NAMES, "npz", "image_folder", "synthetic")
SPLITS = ("train", "test")
_RESIZING_SOURCES = ("image_folder", "synthetic")
# Fields of `config.data` that only some sources read; set for another, they are refused
# rather than ignored (asking for 100 digits used to train on all 1,437).
_FIELD_READERS = (("path", ("npz", "image_folder")), ("num_train", ("synthetic",)),
                  ("num_test", ("synthetic",)), ("svhn_extra", ("svhn_cropped",)))
# Sources of fixed-size images up to this size are read once into host memory, where a batch
# is one gather of uint8 arrays (`as_arrays`); larger ones, image folders and sources that
# resize are read example by example. CIFAR-10 takes 150 MiB, SVHN train+extra 1.8 GiB.
IN_MEMORY_BYTES = 8 << 30
_ARRAYS_KEPT = 4  # two splits of two data sets
_arrays_cache: collections.OrderedDict = collections.OrderedDict()


def config_value(data_config, field: str, default=None):
    """`data_config.<field>`, or `default` when the config has no such field."""
    return getattr(data_config, field, default)


def data_dir(data_config) -> str:
    """Where the TFDS data set `data.name` lives: `data.data_dir` (`~` expanded) when set;
    when empty, the bundled digits in this user's cache ($XDG_CACHE_HOME/cliquejax/tfds, by
    default ~/.cache/cliquejax/tfds: built once per user, not per working directory) and
    any other data set where TFDS keeps them ($TFDS_DATA_DIR, else TFDS's default,
    ~/tensorflow_datasets). A config without the field (written before it existed) read
    data/tfds."""
    configured = config_value(data_config, "data_dir", "data/tfds")
    if configured:
        return os.path.expanduser(configured)
    if config_value(data_config, "name") == "digits":
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser(os.path.join("~", ".cache"))
        return os.path.join(cache, "cliquejax", "tfds")
    return os.environ.get("TFDS_DATA_DIR") or tfds_sources.default_data_dir()


def data_path(data_config) -> str:
    """`data.path` with `~` expanded, as a shell would (the npz file or image folder)."""
    return os.path.expanduser(config_value(data_config, "path", "") or "")


def _synthetic_source(data_config, split: str) -> local_sources.SyntheticSource:
    defaults = local_sources.SYNTHETIC_DEFAULTS
    num_examples_field = "num_train" if split == "train" else "num_test"
    return local_sources.SyntheticSource(
        split,
        image_size=config_value(data_config, "image_size", 0) or defaults["image_size"],
        num_classes=config_value(data_config, "num_classes", 0) or defaults["num_classes"],
        num_examples=(
            config_value(data_config, num_examples_field, 0) or defaults[num_examples_field]
        ),
    )


def check_fields(data_config) -> None:
    """The checks of `config.data`'s fields on their own (cheap: nothing is read), so a bad
    choice stops a run before it writes anything, in the order the user gave it
    (`preflight.check_fields_in_given_order`)."""
    name = config_value(data_config, "name")
    if not name or not isinstance(name, str):
        raise ValueError(f"data.name={name!r} is not a data set name; allowed: "
                         f"{', '.join(SOURCE_NAMES)} or another prepared TFDS data set")
    augment.check_settings(config_value(data_config, "augment", "cifar"),
                           config_value(data_config, "flip", False),
                           config_value(data_config, "crop_padding", 0))
    image_size = config_value(data_config, "image_size", 0)
    if image_size < 0 or image_size * image_size > local_sources.Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"data.image_size={image_size}; allowed: 0 (the data set's own size) "
                         f"or a size up to {math.isqrt(local_sources.Image.MAX_IMAGE_PIXELS)} "
                         "(PIL's pixel limit)")
    num_classes = config_value(data_config, "num_classes", 0) or 0
    if num_classes < 0 or num_classes == 1:
        raise ValueError(f"data.num_classes={num_classes}; allowed: 0 (the data set's "
                         "classes) or the number of classes, two or more")
    if name in ("npz", "image_folder") and not data_path(data_config).strip():
        what = "npz file" if name == "npz" else "image folder"
        raise ValueError(f"data.path={config_value(data_config, 'path', '')!r} is empty; "
                         f"allowed: the {what} that data.name={name!r} reads")
    local = ("npz", "image_folder", "synthetic")
    given_dir = config_value(data_config, "data_dir", "")
    # "data/tfds": the default every config had before data_dir could be empty, which older
    # npz and folder runs' config.json still hold; anything else set for them is ignored.
    if name in local and given_dir and given_dir != "data/tfds":
        raise ValueError(
            f"data.data_dir={given_dir!r} is read with TFDS data sets (and digits) only, not "
            f"with data.name={name!r} (which reads data.path); allowed: data.data_dir='' "
            f"with {name!r}")
    for field, readers in _FIELD_READERS:
        value = config_value(data_config, field)
        if value and name not in readers:
            raise ValueError(
                f"data.{field}={value!r} is read with data.name={' or '.join(readers)} only, "
                f"not with data.name={name!r} (which would ignore it); allowed: "
                f"data.{field}={type(value)()!r} with {name!r}")


def load_source(data_config, split: str):
    """Opens `split` ('train' or 'test') of the data set named by `data_config.name`.

    Every source has `__len__`, `__getitem__(i) -> {"image": uint8 HxWxC, "label": int}` and
    a `num_classes` attribute.
    """
    check_fields(data_config)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not known; allowed: {', '.join(SPLITS)}")
    name = config_value(data_config, "name")
    image_size = config_value(data_config, "image_size", 0)
    num_classes = config_value(data_config, "num_classes", 0) or 0
    if name == "synthetic":
        source = _synthetic_source(data_config, split)
    elif name == "npz":
        source = local_sources.NpzSource(data_path(data_config), split, num_classes)
    elif name == "image_folder":
        source = local_sources.ImageFolderSource(data_path(data_config), split, image_size,
                                                 num_classes)
    else:
        source = tfds_sources.open_tfds_source(
            name,
            split,
            data_dir(data_config),
            svhn_extra=bool(config_value(data_config, "svhn_extra", False)),
            image_size=image_size,
        )
    if num_classes and name not in ("synthetic", "npz", "image_folder") and \
            source.num_classes != num_classes:
        raise ValueError(f"data set {name!r} has {source.num_classes} classes; the config "
                         f"expects data.num_classes={num_classes}; allowed: "
                         f"--config.data.num_classes=0 (the data set's) or "
                         f"{source.num_classes}")
    if image_size and name not in _RESIZING_SOURCES:
        native_size = source[0]["image"].shape[0]
        if image_size != native_size:
            raise ValueError(
                f"data.image_size={image_size} differs from {name}'s {native_size}; only "
                f"{' and '.join(_RESIZING_SOURCES)} resize: use 0 for {name}"
            )
    return source


def _memory_key(source):
    """What identifies `source`'s content among the sources read into memory, or None for
    a kind of source that is not read into memory."""
    if isinstance(source, local_sources.SyntheticSource):
        return ("synthetic", source.split_id, source.image_shape, source.num_classes,
                source.num_examples)
    if type(source) is tfds_sources.TfdsExampleSource:  # not the resizing subclass
        return ("tfds", str(source._data_source.dataset_info.data_dir),  # noqa: SLF001
                source.stats_cache_key)
    return None


def as_arrays(source):
    """(images uint8 [N, H, W, C], labels int32 [N]) of an in-memory source (npz; a TFDS,
    digits or synthetic one of fixed-size images within IN_MEMORY_BYTES, read once and kept),
    or None for a source read example by example (image folders, resized TFDS images)."""
    if isinstance(source, local_sources.NpzSource):
        return source.images, source.labels.astype(np.int32)
    key = _memory_key(source)
    if key is None:
        return None
    if key in _arrays_cache:
        _arrays_cache.move_to_end(key)
        return _arrays_cache[key]
    first = source[0]["image"]
    if len(source) * first.nbytes > IN_MEMORY_BYTES:
        return None
    images = np.empty((len(source), *first.shape), np.uint8)
    labels = np.empty((len(source),), np.int32)
    for index in range(len(source)):
        example = source[index]
        images[index], labels[index] = example["image"], example["label"]
    _arrays_cache[key] = images, labels
    while len(_arrays_cache) > _ARRAYS_KEPT:
        _arrays_cache.popitem(last=False)
    return images, labels
