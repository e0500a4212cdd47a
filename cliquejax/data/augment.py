"""Per-image augmentation on uint8 HxWxC numpy arrays, driven by a given random generator.

`config.data.augment` picks one of three:
- "cifar": random horizontal flip (`data.flip`, p = 0.5) and pad-and-crop (`data.crop_padding`
  pixels of zero padding, then a random crop back to the image size): the MBCliqueNet
  paper's recipe (Sec. 3.1). With flip off and padding 0 it changes nothing.
- "imagenet": random-resized crop (area 8%-100% of the image, aspect ratio 3/4-4/3, up to 10
  draws then a centre crop, as the Inception / torchvision `RandomResizedCrop`) resized to
  the target size, then the flip if `data.flip`: the training recipe of the CliqueNet
  ImageNet model (the authors' PyTorch code). Evaluation resizes the shorter side to
  round(size * 256 / 224) and takes the centre size x size crop.
- "none": the images as they are.
Resizing is PIL's bilinear filter (with its antialiasing when shrinking), as torchvision's.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

AUGMENTATIONS = ("cifar", "imagenet", "none")
RRC_SCALE = (0.08, 1.0)  # fraction of the image area
RRC_RATIO = (3 / 4, 4 / 3)  # width / height
RRC_ATTEMPTS = 10
EVAL_RESIZE_RATIO = 256 / 224  # shorter side before the centre crop, per output pixel


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


def pad_and_crop(image: np.ndarray, padding: int, offset_y: int, offset_x: int) -> np.ndarray:
    """The HxW window at (offset_y, offset_x) of `image` zero-padded by `padding` on each side.

    Equal to `np.pad(image, padding)[offset_y:offset_y + H, offset_x:offset_x + W]` without
    building the padded image. Offsets range over 0..2*padding.
    """
    height, width = image.shape[:2]
    shift_y, shift_x = offset_y - padding, offset_x - padding
    target_rows = slice(max(0, -shift_y), max(0, height - max(0, shift_y)))
    target_cols = slice(max(0, -shift_x), max(0, width - max(0, shift_x)))
    source_rows = slice(max(0, shift_y), max(0, height + min(0, shift_y)))
    source_cols = slice(max(0, shift_x), max(0, width + min(0, shift_x)))
    cropped = np.zeros_like(image)
    cropped[target_rows, target_cols] = image[source_rows, source_cols]
    return cropped


def augment_image(
    image: np.ndarray, rng: np.random.Generator, *, flip: bool, crop_padding: int
) -> np.ndarray:
    """The "cifar" augmentation: random horizontal flip (p=0.5) if `flip`, then a random
    pad-and-crop if padding > 0.

    The generator is always drawn from in the same order (flip coin, then two offsets), so a
    given generator state gives the same result whatever the settings of earlier calls.
    """
    flip_coin = rng.random()
    offset_y, offset_x = rng.integers(0, 2 * crop_padding + 1, size=2)
    if flip and flip_coin < 0.5:
        image = image[:, ::-1]
    if crop_padding > 0:
        image = pad_and_crop(image, crop_padding, int(offset_y), int(offset_x))
    return np.ascontiguousarray(image)


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

    def train(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.name == "imagenet":
            return augment_imagenet(image, rng, size=self.size, flip=self.flip)
        if self.name == "cifar":
            return augment_image(image, rng, flip=self.flip, crop_padding=self.crop_padding)
        return image

    def evaluate(self, image: np.ndarray) -> np.ndarray:
        if self.name == "imagenet":
            return eval_resize_center_crop(image, self.size)
        return image
