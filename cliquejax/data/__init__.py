"""Input data for cliquejax: sources, data set description and grain pipelines.

`config.data.name` picks the data set: digits (scikit-learn's 8x8 digits, built offline as a
TFDS data set), cifar10, cifar100, svhn_cropped, mnist (TFDS, array_record, prepared
beforehand), npz, image_folder or synthetic.
"""

from cliquejax.data.info import DatasetInfo, channel_stats, dataset_info
from cliquejax.data.pipeline import (
    make_eval_iterator,
    make_train_iterator,
    process_layout,
    steps_per_epoch,
)
from cliquejax.data.sources import SOURCE_NAMES, load_source
from cliquejax.data.tfds_sources import DatasetNotFoundError, prepare_command

__all__ = [
    "SOURCE_NAMES",
    "DatasetInfo",
    "DatasetNotFoundError",
    "channel_stats",
    "dataset_info",
    "load_source",
    "make_eval_iterator",
    "make_train_iterator",
    "prepare_command",
    "process_layout",
    "steps_per_epoch",
]
