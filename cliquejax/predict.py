"""Classes of images from a run's latest checkpoint, through the training code.

    python -m cliquejax.predict --workdir=runs/x images.npz [--logits out.npy] [--top=K]
    python -m cliquejax.predict --workdir=runs/x cat.png dog.jpg

Images are uint8 pixels of the data set's size: an .npz with `images` (N x H x W [x C]) or
PNG/JPEG files (decoded as the image folders are, `data.local_sources.decode_image`, to grey
or RGB to match the data set; not resized). A run with `data.augment=imagenet` takes them at
any size and resizes and centre-crops them as its evaluation does (`augment.eval_images`).
They are normalised with the statistics the run
recorded (data.json), as the training step does, and run through the trained network, so
this is the reference the exported files are compared with; the data set is not read. One
line per image: its name (index or path), then its `top` classes.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from cliquejax import cli, export, standalone

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_inputs(paths: list[str], image_shape, augmentation=None
                ) -> tuple[np.ndarray, list[str]]:
    """(uint8 images (N, H, W, C), one label per image) from one .npz or image files, in
    the run's evaluation view (`augment.eval_images`): with data.augment=imagenet, images of
    any size resized and centre-cropped to `image_shape`, as evaluation does."""
    from cliquejax.data import augment

    native = augmentation is not None and augmentation.needs_native_images
    if len(paths) == 1 and paths[0].lower().endswith(".npz"):
        images = standalone.read_images(paths[0])
        shape = ((*np.shape(images)[1:3], image_shape[-1]) if native and np.ndim(images) >= 3
                 else image_shape)
        images = standalone.check_images(images, shape)
        if native:
            images = augment.eval_images(images, augmentation)
        return images, [str(i) for i in range(len(images))]
    from cliquejax.data import local_sources

    images = []
    for path in paths:
        if not path.lower().endswith(IMAGE_SUFFIXES):
            raise standalone.StandaloneError(
                f"{path!r}: allowed inputs are one .npz (key 'images') or .png/.jpg/.jpeg files")
        local_sources.check_image_file(path)  # PIL's pixel limit, a damaged header
        pixels = local_sources.decode_image(path, image_shape[-1])  # 16-bit: its real range
        if native:
            images.append(augment.eval_images([pixels], augmentation)[0])
            continue
        if pixels.shape[:2] != tuple(image_shape[:2]):
            raise standalone.StandaloneError(
                f"{path!r} is {pixels.shape[1]}x{pixels.shape[0]} pixels; allowed: "
                f"{image_shape[1]}x{image_shape[0]}, the size the network was trained on")
        images.append(pixels.reshape(image_shape))
    return np.stack(images), list(paths)


def predictor(trainer):
    """`uint8 images -> logits` of the trainer's state: the training steps' normalisation,
    then the network's eval-mode forward pass."""
    from cliquejax.data.augment import normalize

    mean, std = trainer.info.mean, trainer.info.std
    variables = {"params": trainer.state["params"], "batch_stats": trainer.state["batch_stats"]}
    apply = jax.jit(lambda v, x: trainer.model.apply(v, normalize(x, mean, std), train=False))

    def predict(images):
        images = standalone.check_images(images, trainer.info.image_shape)
        return np.asarray(apply(variables, images))

    return predict


def main(argv=None) -> None:
    parser = standalone.OneLineParser(prog="python -m cliquejax.predict", notes=export.NO_CONFIG,
                                      description="Classes of images from a run's checkpoint.")
    parser.add_argument("--workdir", required=True, help="the run directory")
    parser.add_argument("inputs", nargs="+", help="one .npz (key 'images') or PNG/JPEG files")
    parser.add_argument("--logits", help="also save the logits (N, classes) to this .npy")
    parser.add_argument("--top", type=int, default=1, help="classes printed per image")
    args = parser.parse_args(argv)
    cli.quiet_logging()
    try:
        if args.top < 1:
            raise ValueError(f"--top={args.top}; allowed: 1 or more")
        standalone.check_output(args.logits)
        missing = [p for p in args.inputs if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"{missing[0]!r} is not a file; allowed: one .npz (key 'images') "
                             "or PNG/JPEG files")
        _, trainer = export.restore(args.workdir, "predict")
        trainer.checkpoints.close()
        from cliquejax.data import pipeline

        view = pipeline.augmentation_from_config(trainer.config.data, trainer.info.image_shape)
        images, labels = read_inputs(args.inputs, trainer.info.image_shape, view)
        logits = predictor(trainer)(images)
        if args.logits:
            standalone.save_logits(args.logits, logits)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {cli.first_line(error)}", file=sys.stderr)
        sys.exit(2)
    top = min(args.top, logits.shape[-1])
    print("\n".join(standalone.top_lines(logits, labels, export.class_names(trainer), top)))


if __name__ == "__main__":
    main()
