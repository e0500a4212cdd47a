"""The augmentations of `config.data.augment` (cifar, imagenet, none): geometry of every
transform on real images, and the pipeline's determinism with them."""

import importlib
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from cliquejax import data
from cliquejax.data import augment, pipeline
from configs.default import get_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_config(**overrides):
    config = get_config().data
    config.update(overrides)
    return config


def random_image(height, width, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), np.uint8)


def ramp_image(height, width):
    """Channel 0 = column index, channel 1 = row index, channel 2 = 100: a resampled view
    shows, pixel by pixel, which source coordinates it came from (bilinear interpolation and
    PIL's antialiasing filter keep a linear ramp linear away from the image border)."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([cols, rows, np.full_like(rows, 100)], -1).astype(np.uint8)


# --- cifar: flip and pad-and-crop, on the device ---------------------------------------


def numpy_flip_and_crop(image, flip, offset_y, offset_x, padding):
    """The "cifar" augmentation written out in numpy: mirror, zero-pad, take the window."""
    if flip:
        image = image[:, ::-1]
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    return padded[offset_y:offset_y + image.shape[0], offset_x:offset_x + image.shape[1]]


def cifar_view(batch, seed=0, flip=True, crop_padding=2, mean=(0.0,) * 3, std=(1.0,) * 3):
    choice = augment.Augmentation("cifar", flip=flip, crop_padding=crop_padding, size=6)
    view = jax.jit(lambda b: augment.device_view(b, augmentation=choice, mean=mean, std=std,
                                                 seed=seed, train=True))
    return np.asarray(view(batch)["image"])


def test_device_flip_and_crop_equal_the_numpy_version_for_every_draw():
    count, padding = 300, 2
    images = np.stack([random_image(6, 7, seed=i) for i in range(count)])
    position = np.stack([np.full(count, 3), np.arange(count)], -1).astype(np.int32)
    flips, offsets = jax.device_get(augment.cifar_draws(augment.example_keys(5, position),
                                                        padding))
    out = cifar_view({"image": images, "position": position}, seed=5, crop_padding=padding)
    assert out.dtype == np.float32
    for index in range(count):
        expected = numpy_flip_and_crop(images[index], flips[index], *offsets[index], padding)
        np.testing.assert_array_equal(out[index], expected.astype(np.float32))
    assert set(flips.tolist()) == {True, False}
    seen = {tuple(offset) for offset in offsets.tolist()}
    assert seen == {(y, x) for y in range(5) for x in range(5)}  # every offset, no other


def test_device_augmentation_is_keyed_by_seed_and_position_only():
    images = np.stack([random_image(6, 6, seed=i) for i in range(16)])
    position = np.stack([np.full(16, 1), np.arange(40, 56)], -1).astype(np.int32)
    out = cifar_view({"image": images, "position": position})
    order = np.random.default_rng(0).permutation(16)
    shuffled = cifar_view({"image": images[order], "position": position[order]})
    np.testing.assert_array_equal(shuffled, out[order])  # the batch around it plays no part
    halves = [cifar_view({"image": images[part], "position": position[part]})
              for part in (slice(0, 8), slice(8, 16))]
    np.testing.assert_array_equal(np.concatenate(halves), out)  # nor does the batch size
    assert not np.array_equal(cifar_view({"image": images, "position": position}, seed=1), out)
    later = position + np.array([1, 0], np.int32)  # the next epoch: other draws
    assert not np.array_equal(cifar_view({"image": images, "position": later}), out)


def test_device_view_without_augmentation_only_normalises():
    images = np.stack([random_image(6, 6, seed=i) for i in range(4)])
    position = np.zeros((4, 2), np.int32)
    mean, std = (10.0, 20.0, 30.0), (2.0, 4.0, 8.0)
    out = cifar_view({"image": images, "position": position}, flip=False, crop_padding=0,
                     mean=mean, std=std)
    expected = (images.astype(np.float32) - np.float32(mean)) * (1 / np.float32(std))
    np.testing.assert_allclose(out, expected, rtol=1e-6)


# --- imagenet: random-resized crop, flip, evaluation resize + centre crop --------------


@pytest.mark.parametrize("height, width", [(200, 300), (256, 256), (300, 180)])
def test_random_resized_crop_box_lies_in_the_image_within_scale_and_ratio(height, width):
    fractions, ratios = [], []
    for seed in range(2000):
        top, left, box_height, box_width = augment.random_resized_crop_box(
            height, width, np.random.default_rng(seed))
        assert 0 <= top and top + box_height <= height
        assert 0 <= left and left + box_width <= width
        fractions.append(box_height * box_width / (height * width))
        ratios.append(box_width / box_height)
    # the box sides are rounded to pixels: allow that much beyond the sampled limits; the
    # largest box with a ratio in 3/4..4/3 that fits is `largest` of the area
    largest = min(width, 4 / 3 * height) * min(height, 4 / 3 * width) / (height * width)
    assert 0.08 * 0.97 <= min(fractions) < 0.12 and 0.9 * largest < max(fractions) <= 1.0
    assert 0.75 * 0.98 <= min(ratios) < 0.8 and 1.25 < max(ratios) <= 4 / 3 * 1.02


def test_random_resized_crop_falls_back_to_the_centre_box():
    # 10 x 400: no box of at least 8% of the area with ratio <= 4/3 fits in 10 rows
    box = augment.random_resized_crop_box(10, 400, np.random.default_rng(0))
    assert box == (0, (400 - 13) // 2, 10, 13)  # full height, width 10 * 4/3, centred
    assert augment.random_resized_crop_box(400, 10, np.random.default_rng(0)) == (
        (400 - 13) // 2, 0, 13, 10)


def test_resized_crop_shows_the_box_resampled():
    image = ramp_image(120, 200)
    top, left, box_height, box_width, size = 20, 50, 80, 120, 40
    out = augment.resized_crop(image, (top, left, box_height, box_width), size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    centres = np.arange(size) + 0.5
    expected_cols = left + centres * box_width / size - 0.5
    expected_rows = top + centres * box_height / size - 0.5
    np.testing.assert_allclose(out[size // 2, :, 0], expected_cols, atol=1.0)
    np.testing.assert_allclose(out[:, size // 2, 1], expected_rows, atol=1.0)
    assert (out[..., 2] == 100).all()
    gray = augment.resized_crop(image[..., :1], (top, left, box_height, box_width), size)
    np.testing.assert_array_equal(gray, out[..., :1])


def test_imagenet_training_view_is_the_crop_then_the_flip():
    image = random_image(48, 64, seed=2)
    flips = set()
    for seed in range(12):
        out = augment.augment_imagenet(image, np.random.default_rng(seed), size=24, flip=True)
        replay = np.random.default_rng(seed)
        flipped = replay.random() < 0.5  # the coin comes first, then the box
        crop = augment.resized_crop(image, augment.random_resized_crop_box(48, 64, replay), 24)
        np.testing.assert_array_equal(out, crop[:, ::-1] if flipped else crop)
        flips.add(flipped)
    assert flips == {True, False}


def test_eval_resize_and_centre_crop_geometry():
    # shorter side 40 -> round(28 * 256 / 224) = 32, longer 60 -> 48; crop 28 at (2, 10)
    assert augment.eval_resize_box(40, 60, 28) == (32, 48, 2, 10)
    assert augment.eval_resize_box(60, 40, 28) == (48, 32, 10, 2)
    assert augment.eval_resize_box(375, 500, 224) == (256, 341, 16, 58)
    image = ramp_image(40, 60)
    out = augment.eval_resize_center_crop(image, 28)
    assert out.shape == (28, 28, 3)
    centres = np.arange(28) + 0.5
    np.testing.assert_allclose(out[14, :, 0], (10 + centres) * 60 / 48 - 0.5, atol=1.0)
    np.testing.assert_allclose(out[:, 14, 1], (2 + centres) * 40 / 32 - 0.5, atol=1.0)


# --- the pipeline with each choice -----------------------------------------------------


@pytest.fixture
def npz_config(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (48, 12, 12, 3), dtype=np.uint8),
              "y_train": np.arange(48),
              "x_test": rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8),
              "y_test": np.arange(10)}
    np.savez(tmp_path / "data.npz", **arrays)
    return data_config(name="npz", path=str(tmp_path / "data.npz"))


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_imagenet_batches_are_the_same_for_the_same_step(npz_config):
    npz_config.update(augment="imagenet", flip=True)
    uninterrupted = take(data.make_train_iterator(npz_config, global_batch_size=16, seed=3), 5)
    for _ in range(2):
        resumed = take(data.make_train_iterator(npz_config, global_batch_size=16, seed=3,
                                                start_step=3), 2)
        for expected, batch in zip(uninterrupted[3:], resumed, strict=True):
            for key in ("image", "label"):
                np.testing.assert_array_equal(expected[key], batch[key])
    assert uninterrupted[0]["image"].shape == (16, 12, 12, 3)
    npz_config.update(augment="none", flip=False)
    plain = next(data.make_train_iterator(npz_config, global_batch_size=16, seed=3))
    np.testing.assert_array_equal(plain["label"], uninterrupted[0]["label"])
    assert not np.array_equal(plain["image"], uninterrupted[0]["image"])


def test_imagenet_eval_batches_are_the_resized_centre_crops(npz_config):
    npz_config.augment = "imagenet"
    batch = next(data.make_eval_iterator(npz_config, global_batch_size=10))
    source = data.load_source(npz_config, "test")
    for index in range(10):
        expected = augment.eval_resize_center_crop(source[index]["image"], 12)
        np.testing.assert_array_equal(batch["image"][index], expected)


def test_imagenet_crops_read_image_folders_at_their_own_size(tmp_path):
    native = {}
    for split in ("train", "val"):
        for label, class_name in enumerate(("a", "b")):
            folder = tmp_path / split / class_name
            folder.mkdir(parents=True)
            pixels = ramp_image(30, 45) // (label + 1)
            Image.fromarray(pixels).save(folder / "0.png")
            native[(split, label)] = pixels
    config = data_config(name="image_folder", path=str(tmp_path), image_size=8,
                         augment="imagenet", flip=True)
    info = data.dataset_info(config)
    assert info.image_shape == (8, 8, 3)
    train = next(data.make_train_iterator(config, global_batch_size=2, seed=0))
    assert train["image"].shape == (2, 8, 8, 3)
    batch = next(data.make_eval_iterator(config, global_batch_size=2))
    for index, label in enumerate(batch["label"]):
        # the 30 x 45 file resized (shorter side 9) and centre-cropped, not the squashed 8 x 8
        expected = augment.eval_resize_center_crop(native[("val", int(label))], 8)
        np.testing.assert_array_equal(batch["image"][index], expected)


@pytest.mark.parametrize("settings, fragments", [
    (dict(augment="random"), ["data.augment='random'", "cifar, imagenet, none"]),
    (dict(augment="none", flip=True), ["data.augment='none'", "data.flip=True"]),
    (dict(augment="imagenet", crop_padding=4), ["data.crop_padding=4"]),
    (dict(crop_padding=-1), ["data.crop_padding=-1"]),
])
def test_bad_augment_settings_are_one_line_errors(npz_config, settings, fragments):
    npz_config.update(settings)
    with pytest.raises(ValueError) as error_info:
        data.dataset_info(npz_config)
    message = str(error_info.value)
    assert "\n" not in message and all(f in message for f in fragments)


def test_a_run_config_without_the_field_keeps_the_cifar_augmentation(npz_config):
    with npz_config.unlocked():
        del npz_config["augment"]
    npz_config.update(flip=True, crop_padding=2)
    choice = pipeline.augmentation_from_config(npz_config, (12, 12, 3))
    assert (choice.name, choice.flip, choice.crop_padding) == ("cifar", True, 2)


def test_every_config_states_a_consistent_augmentation():
    for path in sorted((REPO_ROOT / "configs").glob("*.py")):
        if path.stem in ("__init__",):
            continue
        config = importlib.import_module(f"configs.{path.stem}").get_config()
        d = config.data
        augment.check_settings(d.augment, d.flip, d.crop_padding)
        if d.flip or d.crop_padding:
            assert d.augment in ("cifar", "imagenet"), path.name
    assert importlib.import_module("configs.cliquenet_imagenet").get_config().data.augment == (
        "imagenet")
