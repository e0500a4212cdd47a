"""Per-image augmentation on uint8 HxWxC numpy arrays, driven by a given random generator."""

from __future__ import annotations

import numpy as np


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
    """Random horizontal flip (p=0.5) if `flip`, then a random pad-and-crop if padding > 0.

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
