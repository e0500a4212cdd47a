"""Data sources, dataset info and the grain pipelines, on small data sets made in tmp_path."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cliquejax import data
from cliquejax.data import augment, digits_builder, pipeline, sources
from configs.default import get_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_config(**overrides) -> ml_collections.ConfigDict:
    config = get_config().data
    config.update(overrides)
    return config


def assert_one_line_error(error_info, *fragments):
    message = str(error_info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def device_view(config, batch, seed=0, train=True):
    """`batch` as the jitted step feeds the network (augmented on the device, normalised)."""
    info = data.dataset_info(config)
    choice = pipeline.augmentation_from_config(config, info.image_shape)
    return jax.device_get(augment.device_view(batch, augmentation=choice, mean=info.mean,
                                              std=info.std, seed=seed, train=train))


def write_npz(path, num_train=96, num_test=37, shape=(6, 6, 3), seed=0):
    """Labels are the example numbers, so batches show exactly which examples they hold."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (num_train, *shape), dtype=np.uint8),
        "y_train": np.arange(num_train),
        "x_test": rng.integers(0, 256, (num_test, *shape), dtype=np.uint8),
        "y_test": np.arange(num_test),
    }
    np.savez(path, **arrays)
    return arrays


@pytest.fixture
def npz_config(tmp_path):
    write_npz(tmp_path / "data.npz")
    return data_config(name="npz", path=str(tmp_path / "data.npz"))


def test_digits_builds_once_through_tfds_and_reads_back(tmp_path):
    config = data_config(name="digits", data_dir=str(tmp_path))
    info = data.dataset_info(config)
    assert (info.num_train, info.num_test) == (1437, 360)
    assert (info.image_shape, info.num_classes) == ((8, 8, 1), 10)
    train_file = next((tmp_path / "cliquejax_digits" / "1.0.0").glob("*-train.array_record*"))
    built_at = train_file.stat().st_mtime_ns
    assert data.dataset_info(config) == info
    assert train_file.stat().st_mtime_ns == built_at

    stored = tfds.data_source("cliquejax_digits", split="train", data_dir=str(tmp_path))
    assert len(stored) == 1437
    source = data.load_source(config, "train")
    images = np.stack([source[i]["image"] for i in range(len(source))])
    labels = {source[i]["label"] for i in range(len(source))}
    assert images.dtype == np.uint8 and images.shape == (1437, 8, 8, 1)
    assert images.max() == 255 and labels == set(range(10))
    split = digits_builder.digits_split_indices()
    assert not set(split["train"]) & set(split["test"])


@pytest.mark.slow
def test_digits_build_is_safe_with_two_processes_at_once(tmp_path):
    script = (
        "import sys; from cliquejax.data import digits_builder as d; "
        "d.ensure_digits_prepared(sys.argv[1])"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr.decode()[-2000:]
    info = data.dataset_info(data_config(name="digits", data_dir=str(tmp_path)))
    assert (info.num_train, info.num_test) == (1437, 360)


def test_cifar10_path_reads_tfds_mock_data(tmp_path):
    config = data_config(name="cifar10", data_dir=str(tmp_path), flip=True, crop_padding=4)
    with tfds.testing.mock_data(num_examples=48):
        info = data.dataset_info(config)
        assert (info.image_shape, info.num_classes, info.num_train) == ((32, 32, 3), 10, 48)
        batch = next(data.make_train_iterator(config, global_batch_size=16, seed=0))
        eval_batches = list(data.make_eval_iterator(config, global_batch_size=32))
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["label"].max() < 10
    assert batch["position"].shape == (16, 2) and batch["position"].dtype == np.int32
    assert sum(b["mask"].sum() for b in eval_batches) == 48
    assert list((tmp_path / "cliquejax_stats").glob("cifar10-*-train-48.json"))


def test_unprepared_tfds_data_set_says_how_to_prepare_it(tmp_path):
    config = data_config(name="cifar10", data_dir=str(tmp_path))
    with pytest.raises(data.DatasetNotFoundError) as error_info:
        data.dataset_info(config)
    assert_one_line_error(error_info, "tfds build cifar10", "--file_format=array_record")


def test_unknown_name_lists_allowed_names():
    with pytest.raises(ValueError) as error_info:
        data.load_source(data_config(name="imagenet"), "train")
    assert_one_line_error(error_info, "'imagenet'", "cifar10", "synthetic")


def test_npz_grayscale_images_get_a_channel_axis(tmp_path):
    arrays = write_npz(tmp_path / "gray.npz", num_train=10, num_test=4, shape=(5, 5))
    config = data_config(name="npz", path=str(tmp_path / "gray.npz"))
    info = data.dataset_info(config)
    assert (info.image_shape, info.num_classes, info.num_train) == ((5, 5, 1), 10, 10)
    example = data.load_source(config, "test")[3]
    np.testing.assert_array_equal(example["image"][..., 0], arrays["x_test"][3])
    assert example["label"] == 3


NPZ_DEFECTS = [  # (case, the key the error must name, how to spoil good arrays)
    ("missing key", "x_train", lambda arrays: arrays.pop("x_train")),
    ("float images", "x_test", lambda arrays: arrays.update(x_test=arrays["x_test"] / 2.0)),
    (
        "two channels",
        "x_train",
        lambda arrays: arrays.update(x_train=np.zeros((10, 5, 5, 2), np.uint8)),
    ),
    ("short labels", "y_train", lambda arrays: arrays.update(y_train=np.arange(9))),
    ("negative labels", "y_test", lambda arrays: arrays.update(y_test=-np.arange(4))),
    ("float labels", "y_test", lambda arrays: arrays.update(y_test=np.arange(4.0))),
    (
        "other image size",
        "x_test",
        lambda arrays: arrays.update(x_test=np.zeros((4, 6, 6, 3), np.uint8)),
    ),
]


@pytest.mark.parametrize(
    "key, spoil", [pytest.param(key, spoil, id=case) for case, key, spoil in NPZ_DEFECTS]
)
def test_npz_defects_name_the_key(tmp_path, key, spoil):
    arrays = write_npz(tmp_path / "good.npz", num_train=10, num_test=4, shape=(5, 5, 3))
    spoil(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError) as error_info:
        data.load_source(data_config(name="npz", path=str(tmp_path / "bad.npz")), "train")
    assert_one_line_error(error_info, repr(key))


def test_image_folder_reads_resizes_and_labels_by_sorted_class(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for class_name in ("zebra", "ant"):
            folder = tmp_path / split / class_name
            folder.mkdir(parents=True)
            for number in range(count):
                pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{number}.png")
    config = data_config(name="image_folder", path=str(tmp_path), image_size=8)
    info = data.dataset_info(config)
    assert (info.image_shape, info.num_classes) == ((8, 8, 3), 2)
    assert (info.num_train, info.num_test) == (6, 4)
    test_source = data.load_source(config, "test")
    assert [test_source[i]["label"] for i in range(4)] == [0, 0, 1, 1]  # ant, ant, zebra, zebra
    with pytest.raises(ValueError) as error_info:
        data.load_source(data_config(name="image_folder", path=str(tmp_path / "no")), "train")
    assert_one_line_error(error_info, "not found")


def test_synthetic_has_configured_shape_and_is_deterministic():
    config = data_config(name="synthetic", image_size=12, num_classes=5, num_train=40, num_test=8)
    info = data.dataset_info(config)
    assert (info.image_shape, info.num_classes) == ((12, 12, 3), 5)
    assert (info.num_train, info.num_test) == (40, 8)
    first, again = data.load_source(config, "train"), data.load_source(config, "train")
    np.testing.assert_array_equal(first[7]["image"], again[7]["image"])
    assert {first[i]["label"] for i in range(40)} <= set(range(5))
    assert not np.array_equal(first[7]["image"], data.load_source(config, "test")[7]["image"])


def test_train_batches_are_normalised_and_each_epoch_visits_every_example_once(npz_config):
    arrays = dict(np.load(npz_config.path))  # what the fixture wrote
    iterator = data.make_train_iterator(npz_config, global_batch_size=32, seed=1)
    epochs = [take(iterator, 3) for _ in range(2)]
    batch = epochs[0][0]
    assert batch["image"].shape == (32, 6, 6, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    for step, host in enumerate(epochs[0]):  # the examples the labels name, where they stand
        np.testing.assert_array_equal(host["image"], arrays["x_train"][host["label"]])
        np.testing.assert_array_equal(host["position"],
                                      np.stack([np.zeros(32), np.arange(32) + 32 * step], -1))
    images = np.concatenate([device_view(npz_config, b)["image"] for b in epochs[0]])
    np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
    orders = [np.concatenate([b["label"] for b in epoch]) for epoch in epochs]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(96))
    assert not np.array_equal(orders[0], orders[1])


def test_resume_at_a_step_equals_the_uninterrupted_run(npz_config):
    npz_config.update(flip=True, crop_padding=2)
    uninterrupted = take(data.make_train_iterator(npz_config, global_batch_size=16, seed=4), 14)
    resumed = take(
        data.make_train_iterator(npz_config, global_batch_size=16, seed=4, start_step=5), 9
    )
    for expected, batch in zip(uninterrupted[5:], resumed, strict=True):
        for key in ("image", "label", "position"):
            np.testing.assert_array_equal(expected[key], batch[key])
        np.testing.assert_array_equal(device_view(npz_config, expected, seed=4)["image"],
                                      device_view(npz_config, batch, seed=4)["image"])
    unaugmented = data_config(name="npz", path=npz_config.path)
    assert not np.array_equal(device_view(unaugmented, uninterrupted[0], seed=4)["image"],
                              device_view(npz_config, uninterrupted[0], seed=4)["image"])


def test_two_processes_together_see_the_one_process_batches(npz_config):
    npz_config.update(flip=True, crop_padding=3)
    kwargs = dict(global_batch_size=32, seed=7, start_step=1)
    single = take(data.make_train_iterator(npz_config, **kwargs, process_count=1), 5)
    halves = [
        take(data.make_train_iterator(npz_config, **kwargs, process_index=p, process_count=2), 5)
        for p in range(2)
    ]
    for step, expected in enumerate(single):
        assert halves[0][step]["image"].shape[0] == 16
        for key in ("image", "label", "position"):
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(joined, expected[key])


@pytest.mark.slow  # grain's workers are processes
def test_worker_processes_yield_the_in_process_batches(tmp_path):
    for split, count in (("train", 12), ("test", 4)):
        for index in range(count):
            folder = tmp_path / split / f"class{index % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((6, 6, 3), 20 * index, np.uint8)).save(folder / f"{index}.png")
    config = data_config(name="image_folder", path=str(tmp_path), flip=True, crop_padding=2,
                         worker_count="0")
    in_process = take(data.make_train_iterator(config, global_batch_size=4, seed=2), 4)
    config.worker_count = "1"
    with_worker = take(data.make_train_iterator(config, global_batch_size=4, seed=2), 4)
    for expected, batch in zip(in_process, with_worker, strict=True):
        for key in ("image", "label", "position"):
            np.testing.assert_array_equal(expected[key], batch[key])


def test_eval_covers_every_test_example_once_across_processes(npz_config):
    seen = []
    for process in range(2):
        batches = list(
            data.make_eval_iterator(
                npz_config, global_batch_size=16, process_index=process, process_count=2
            )
        )
        assert len(batches) == 3  # ceil(37 / 16)
        for batch in batches:
            assert batch["image"].shape == (8, 6, 6, 3) and batch["mask"].dtype == np.float32
            seen += list(batch["label"][batch["mask"] == 1])
    assert sorted(seen) == list(range(37))


def test_batch_size_errors_are_one_line(npz_config):
    with pytest.raises(ValueError) as error_info:
        data.make_train_iterator(npz_config, global_batch_size=128, seed=0)
    assert_one_line_error(error_info, "larger than", "96")
    with pytest.raises(ValueError) as error_info:
        data.make_train_iterator(npz_config, global_batch_size=30, seed=0, process_count=4)
    assert_one_line_error(error_info, "not divisible")


# --- issue 26: in-memory sources give uint8 batches by one gather; workers decode folders ---


def test_in_memory_batches_are_the_sources_examples_in_the_epochs_order():
    config = data_config(name="synthetic", image_size=8, num_train=40, num_test=6)
    source = data.load_source(config, "train")
    images, labels = data.sources.as_arrays(source)
    assert images.shape == (40, 8, 8, 3) and labels.dtype == np.int32
    batches = take(data.make_train_iterator(config, global_batch_size=16, seed=3,
                                            start_step=2, process_index=1, process_count=2), 2)
    for step, batch in zip((2, 3), batches, strict=True):
        epoch, in_epoch = divmod(step, 40 // 16)
        order = np.random.default_rng([3, 0, epoch]).permutation(40)
        positions = in_epoch * 16 + 8 + np.arange(8)  # process 1's half of the global batch
        for row, position in enumerate(positions):
            example = source[int(order[position])]
            np.testing.assert_array_equal(batch["image"][row], example["image"])
            assert batch["label"][row] == example["label"]
            assert tuple(batch["position"][row]) == (epoch, position)
    (last,) = data.make_eval_iterator(config, global_batch_size=8)
    np.testing.assert_array_equal(last["mask"], [1] * 6 + [0] * 2)
    assert not last["image"][6:].any()


@pytest.mark.parametrize("value, workers", [("auto", 0), ("0", 0), ("3", 3), (2, 2)])
def test_worker_count_auto_is_none_on_a_cpu_host(value, workers):
    config = ml_collections.ConfigDict({"worker_count": value})
    assert data.pipeline.worker_count(config) == workers


@pytest.mark.parametrize("value", ["-1", "many", True, 1.5])
def test_bad_worker_count_is_a_one_line_error(value):
    with pytest.raises(ValueError) as error_info:
        data.pipeline.worker_count(ml_collections.ConfigDict({"worker_count": value}))
    assert_one_line_error(error_info, f"data.worker_count={value!r}", "'auto'")



def test_preflight_reads_an_in_memory_test_split_once_for_the_pipeline(tmp_path):
    """The test-split check of `preflight` reads an in-memory split as the evaluation
    pipeline does (`sources.as_arrays`), so the pipeline finds it read and decodes nothing
    again; the arrays are those of the split."""
    from cliquejax.data import sources
    from cliquejax.train import preflight

    config = data_config(name="digits", data_dir=str(tmp_path))
    info = data.dataset_info(config)
    sources._arrays_cache.clear()
    preflight.check_test_set(config, info)
    (images, labels), = sources._arrays_cache.values()
    assert images.shape == (info.num_test, *info.image_shape)
    assert sources.as_arrays(data.load_source(config, "test"))[0] is images
    test = data.load_source(config, "test")
    np.testing.assert_array_equal(images[7], test[7]["image"])
    assert labels[7] == test[7]["label"]


def test_default_data_directories_follow_the_environment(monkeypatch, tmp_path):
    """data.data_dir="": the digits in the user's cache, a TFDS data set in $TFDS_DATA_DIR or
    TFDS's default; never relative to the working directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    config = get_config().data
    assert config.data_dir == "" and config.name == "digits"
    assert sources.data_dir(config) == str(tmp_path / "cache" / "cliquejax" / "tfds")
    config.name = "cifar10"
    assert sources.data_dir(config) == str(tmp_path / "tfds")
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert sources.data_dir(config) == tfds.core.constants.DATA_DIR
    config.data_dir = "~/elsewhere"
    assert sources.data_dir(config) == os.path.expanduser("~/elsewhere")
