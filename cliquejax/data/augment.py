"""Training augmentation and the network's input view of uint8 HxWxC images.

`config.data.augment` picks one of three:
- "cifar": random horizontal flip (`data.flip`, p = 0.5) and pad-and-crop (`data.crop_padding`
  pixels of zero padding, then a random crop back to the image size): the MBCliqueNet
  paper's recipe (Sec. 3.1). With flip off and padding 0 it changes nothing. It runs on the
  accelerator, inside the jitted step (`device_view`), on a whole uint8 batch: each example
  draws from its own key, folded from (seed, epoch, position of the example in the epoch),
  so a batch is a pure function of the seed and the step however it is sharded.
- "imagenet": random-resized crop (area 8%-100% of the image, aspect ratio 3/4-4/3, up to 10
  draws then a centre crop, as the Inception / torchvision `RandomResizedCrop`) resized to
  the target size, then the flip if `data.flip`: the training recipe of the CliqueNet
  ImageNet model (the authors' PyTorch code). Evaluation resizes the shorter side to
  round(size * 256 / 224) and takes the centre size x size crop.
- "none": the images as they are.
Resizing is PIL's bilinear filter (with its antialiasing when shrinking), as torchvision's;
the "imagenet" crops and their flip run on the host, per image, with a numpy generator.
Every choice ends in `normalize` ((x - mean) / std per channel), on the device.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

AUGMENTATIONS = ("cifar", "imagenet", "none")
RRC_SCALE = (0.08, 1.0)  # fraction of the image area
RRC_RATIO = (3 / 4, 4 / 3)  # width / height
RRC_ATTEMPTS = 10
EVAL_RESIZE_RATIO = 256 / 224  # shorter side before the centre crop, per output pixel
AUGMENTATION_STREAM = 1  # the device keys' stream (the pipeline's epoch order is stream 0)


def check_settings(name: str, flip: bool, crop_padding: int) -> None:
    """One-line ValueError for an unknown augmentation or a setting it would ignore."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"data.augment={name!r} is not known; allowed: {', '.join(AUGMENTATIONS)}")
    if crop_padding < 0:
        raise ValueError(f"data.crop_padding={crop_padding} is negative; allowed: 0 or more")
    if name == "none" and (flip or crop_padding):
        raise ValueError(
            f"data.augment='none' ignores data.flip={flip} and data.crop_padding={crop_padding}; "
            "allowed: data.augment=cifar (flip + pad-and-crop) or flip=False, crop_padding=0")
    if name == "imagenet" and crop_padding:
        raise ValueError(
            f"data.augment='imagenet' takes a random-resized crop, not data.crop_padding="
            f"{crop_padding}; allowed: crop_padding=0, or data.augment=cifar")


def random_resized_crop_box(
    height: int, width: int, rng: np.random.Generator, *, scale=RRC_SCALE, ratio=RRC_RATIO,
    attempts: int = RRC_ATTEMPTS,
) -> tuple[int, int, int, int]:
    """(top, left, box_height, box_width) of a random-resized crop (Szegedy et al. 2015's
    sampling, as torchvision's `RandomResizedCrop.get_params`): an area fraction uniform in
    `scale` and a log-uniform aspect ratio in `ratio`, redrawn until the box fits the image
    (at most `attempts` times); else the largest centre box whose ratio is within `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        box_width = int(round(math.sqrt(target_area * aspect)))
        box_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < box_width <= width and 0 < box_height <= height:
            top = int(rng.integers(0, height - box_height + 1))
            left = int(rng.integers(0, width - box_width + 1))
            return top, left, box_height, box_width
    in_ratio = width / height
    if in_ratio < min(ratio):
        box_width, box_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        box_height, box_width = height, int(round(height * max(ratio)))
    else:
        box_width, box_height = width, height
    return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(resized: Image.Image, channels: int) -> np.ndarray:
    array = np.asarray(resized, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def resized_crop(image: np.ndarray, box, size: int) -> np.ndarray:
    """The `box` (top, left, height, width) of `image` resized to size x size (bilinear)."""
    top, left, box_height, box_width = box
    resized = _to_pil(image).resize(
        (size, size), Image.Resampling.BILINEAR,
        box=(left, top, left + box_width, top + box_height))
    return _from_pil(resized, image.shape[-1])


def augment_imagenet(image: np.ndarray, rng: np.random.Generator, *, size: int,
                     flip: bool) -> np.ndarray:
    """The "imagenet" training augmentation: random-resized crop to size x size, then a
    horizontal flip (p = 0.5) if `flip`. The flip coin is drawn first, so it does not depend
    on how many boxes the crop drew."""
    flip_coin = rng.random()
    box = random_resized_crop_box(image.shape[0], image.shape[1], rng)
    image = resized_crop(image, box, size)
    if flip and flip_coin < 0.5:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def eval_resize_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(resized_height, resized_width, top, left) of the "imagenet" evaluation: the shorter
    side resized to round(size * 256 / 224), the longer in proportion (truncated, as
    torchvision's `Resize`), then the centre size x size crop (torchvision's `CenterCrop`)."""
    short = int(round(size * EVAL_RESIZE_RATIO))
    if height <= width:
        resized_height, resized_width = short, int(short * width / height)
    else:
        resized_height, resized_width = int(short * height / width), short
    top = int(round((resized_height - size) / 2.0))
    left = int(round((resized_width - size) / 2.0))
    return resized_height, resized_width, top, left


def eval_resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The "imagenet" evaluation view of `image` (`eval_resize_box`), size x size."""
    resized_height, resized_width, top, left = eval_resize_box(*image.shape[:2], size)
    resized = _to_pil(image).resize((resized_width, resized_height), Image.Resampling.BILINEAR)
    array = _from_pil(resized, image.shape[-1])
    return np.ascontiguousarray(array[top:top + size, left:left + size])


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """A checked `config.data.augment` choice for images of size x size."""

    name: str
    flip: bool
    crop_padding: int
    size: int

    def __post_init__(self):
        check_settings(self.name, self.flip, self.crop_padding)

    @property
    def needs_native_images(self) -> bool:
        """Whether the crops want the images at their own size (an image folder's, not
        squashed to size x size first)."""
        return self.name == "imagenet"

    def host_train(self, image: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """The host's part of the training augmentation: all of "imagenet" (with `rng`),
        nothing else."""
        if self.name == "imagenet":
            return augment_imagenet(image, rng, size=self.size, flip=self.flip)
        return image

    def evaluate(self, image: np.ndarray) -> np.ndarray:
        if self.name == "imagenet":
            return eval_resize_center_crop(image, self.size)
        return image


def eval_images(images, augmentation: Augmentation) -> np.ndarray:
    """uint8 images (an N x H x W x C array, or a list of H x W x C images of any size with
    "imagenet") as evaluation reads them on the host: each through `augmentation.evaluate`
    (the "imagenet" resize and centre crop; nothing for the others), stacked. What eval's
    pipeline does example by example, and predict and the clqx files do to their inputs;
    the device then normalises them (`normalize`), as the evaluation step does."""
    return np.stack([augmentation.evaluate(np.asarray(image)) for image in images])


# --- on the device: cifar's flip and pad-and-crop, and the normalisation ----------------


def example_keys(seed: int, position):
    """One `jax.random` key per example from `position` int32 [B, 2] = (epoch, position of
    the example in the epoch's order): the same example gets the same key on any device."""
    base = jax.random.fold_in(jax.random.key(seed), AUGMENTATION_STREAM)
    return jax.vmap(lambda where: jax.random.fold_in(jax.random.fold_in(base, where[0]),
                                                     where[1]))(position)


def cifar_draws(keys, crop_padding: int):
    """(flip bool [B], offsets int32 [B, 2]) of the "cifar" augmentation: a fair coin, and
    the crop's (row, column) in 0..2 * crop_padding, each uniform."""
    def draw(key):
        flip_key, crop_key = jax.random.split(key)
        return (jax.random.uniform(flip_key) < 0.5,
                jax.random.randint(crop_key, (2,), 0, 2 * crop_padding + 1))
    return jax.vmap(draw)(keys)


def flip_and_crop(images, flip, offsets, crop_padding: int):
    """uint8 [B, H, W, C] images mirrored along W where `flip` (None: never), then each the
    H x W window at `offsets` (row, column) of itself zero-padded by `crop_padding`."""
    if flip is not None:
        images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
    if crop_padding:
        pad = crop_padding
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        window = images.shape[1:]
        images = jax.vmap(lambda image, at: jax.lax.dynamic_slice(
            image, (at[0], at[1], 0), window))(padded, offsets)
    return images


def normalize(images, mean, std):
    """uint8 images -> float32 (x - mean) * (1 / std) per channel (the training split's
    statistics, 0..255 scale)."""
    inverse_std = np.float32(1.0) / np.asarray(std, np.float32)
    return (images.astype(jnp.float32) - np.asarray(mean, np.float32)) * inverse_std


def device_view(batch: dict, *, augmentation: Augmentation, mean, std, seed: int = 0,
                train: bool = False) -> dict:
    """The batch the network reads, computed inside the jitted step from the pipeline's
    uint8 batch: with `train`, the "cifar" augmentation keyed by `batch["position"]`; then
    `normalize` with `mean` and `std`. Pure: the same batch gives the same bits anywhere."""
    images = batch["image"]
    if train and augmentation.name == "cifar" and (augmentation.flip or
                                                   augmentation.crop_padding):
        flip, offsets = cifar_draws(example_keys(seed, batch["position"]),
                                    augmentation.crop_padding)
        images = flip_and_crop(images, flip if augmentation.flip else None, offsets,
                               augmentation.crop_padding)
    view = {key: value for key, value in batch.items() if key != "position"}
    return dict(view, image=normalize(images, mean, std))
