"""Adding a TFDS image-classification data set is a config change: `data.name` names any
prepared TFDS data set with `image` and `label` features. Tested with a tiny data set built
offline as array_record under its own name (as the digits are)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cliquejax import data, summary
from configs.default import get_config

NAME = "cliquejax_test_stripes"  # the TFDS name of the builder class below
SHAPE, CLASSES, NUM_TRAIN, NUM_VALIDATION = (6, 6, 3), 3, 24, 9


class CliquejaxTestStripes(tfds.core.GeneratorBasedBuilder):
    """Label c: a bright row every (c + 2) rows. `train` and `validation` splits, no `test`
    (like imagenet2012)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=CLASSES),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(NUM_TRAIN),
                "validation": self._generate_examples(NUM_VALIDATION)}

    def _generate_examples(self, count):
        for index in range(count):
            label = index % CLASSES
            image = np.zeros(SHAPE, np.uint8)
            image[::label + 2] = 200
            yield index, {"image": image, "label": label}


class CliquejaxTestSizes(tfds.core.GeneratorBasedBuilder):
    """Images of varying size (like imagenet2012): example i is (4 + i) x (9 - i), grey
    level 10 * label."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8,
                                           encoding="bytes"),
            "label": tfds.features.ClassLabel(num_classes=2),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(), "test": self._generate_examples()}

    def _generate_examples(self):
        for index in range(4):
            image = np.full((4 + index, 9 - index, 3), 10 * (index % 2), np.uint8)
            yield index, {"image": image, "label": index % 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds"))
    for builder in (CliquejaxTestStripes, CliquejaxTestSizes):
        builder(data_dir=directory, file_format="array_record").download_and_prepare(
            file_format="array_record")
    return directory


def stripes_config(data_dir):
    config = get_config()
    config.data.name, config.data.data_dir = NAME, data_dir
    return config


def test_any_prepared_tfds_data_set_is_a_config_change(data_dir):
    config = stripes_config(data_dir)
    info = data.dataset_info(config.data)
    assert (info.image_shape, info.num_classes) == (SHAPE, CLASSES)
    assert (info.num_train, info.num_test) == (NUM_TRAIN, NUM_VALIDATION)  # test: validation
    batch = next(data.make_train_iterator(config.data, global_batch_size=8, seed=0))
    assert batch["image"].shape == (8, *SHAPE) and batch["label"].max() < CLASSES
    test = data.load_source(config.data, "test")
    examples = [test[i] for i in range(len(test))]
    assert sorted(e["label"] for e in examples) == sorted(i % CLASSES for i in range(9))
    for example in examples:  # images and labels read back together
        rows = np.flatnonzero(example["image"][:, 0, 0])
        assert rows[1] - rows[0] == example["label"] + 2
    assert summary.model_input(config) == (SHAPE, CLASSES)  # what the model is built for


def test_unknown_and_non_classification_names_are_one_line_errors(data_dir, tmp_path):
    for name, fragments in [
        ("cliquejax_test_stripez", ("'cliquejax_test_stripez'", "imagenet2012", "synthetic")),
        # a TFDS data set without images: refused before anything is looked for on disk
        ("imdb_reviews", ("'imdb_reviews'", "'image'", "ClassLabel")),
        # TFDS's own readings: a version gave a traceback, CamelCase its warnings and advice
        # to build 'Cifar10'
        ("cifar10:9.9.9", ("data.name='cifar10:9.9.9' is not a data set name", "lower case")),
        ("Cifar10", ("data.name='Cifar10' is not a data set name", "no version")),
    ]:
        config = stripes_config(str(tmp_path))
        config.data.name = name
        with pytest.raises(ValueError) as error_info:
            data.load_source(config.data, "train")
        message = str(error_info.value)
        assert "\n" not in message and all(f in message for f in fragments), message
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_images_of_varying_size_are_resized_to_data_image_size(data_dir):
    config = stripes_config(data_dir)
    config.data.name = "cliquejax_test_sizes"
    with pytest.raises(ValueError, match="data.image_size > 0"):
        data.load_source(config.data, "train")
    config.data.image_size = 5
    info = data.dataset_info(config.data)
    assert (info.image_shape, info.num_classes, info.num_train) == ((5, 5, 3), 2, 4)
    source = data.load_source(config.data, "train")
    for example in (source[i] for i in range(len(source))):
        assert example["image"].shape == (5, 5, 3)
        assert set(np.unique(example["image"])) == {10 * example["label"]}
