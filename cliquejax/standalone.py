"""Run an exported 1-bit network with nothing but jax and numpy installed.

Copy this one file next to a model written by
`python -m cliquejax.export --workdir=RUN --out=model.clqs --format=standalone`, then

    python standalone.py model.clqs images.npz [--logits logits.npy]

prints the top-1 class of each image (npz key `images`: uint8, N x H x W [x C], the data
set's own pixel values; the normalisation is inside the program). From Python:

    predict = standalone.load("model.clqs")   # uint8 images -> float32 logits (numpy)

File layout: magic `CLQS`, little-endian uint32 version, header length and CRC-32 of the
header, a JSON header (classes, class names when known, input shape, the byte sizes of the
three payload parts and the payload's sha256), then the payload: a zlib-compressed serialized
`jax.export.Exported` lowered for cpu, cuda and tpu with a symbolic batch size, the packed
sign bits (uint8, one bit per binary weight) and the float32 weights. The program takes
(images, bits, floats): it unpacks the bits into +-1 inside with shifts and masks, so the
weights are stored once. Its BNs are folded into one multiply-add each, so its logits are the
checkpoint's up to float32 rounding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import zipfile
import zlib


def _interrupted(signum, frame) -> None:
    os.write(2, b"error: interrupted (Ctrl-C)\n")
    os._exit(130)


if __name__ == "__main__":  # Ctrl-C at any moment, even in the imports below: one line
    import signal

    signal.signal(signal.SIGINT, _interrupted)

import numpy as np  # noqa: E402

MAGIC, VERSION = b"CLQS", 1
PLATFORMS = ("cpu", "cuda", "tpu")
_PREFIX = struct.Struct("<4sIII")  # magic, version, header length, header crc32


class StandaloneError(ValueError):
    """A model file or image array this program cannot use (one-line message)."""


def pack(program: bytes, bits: np.ndarray, floats: np.ndarray, header: dict) -> bytes:
    """The file's bytes: `header` (classes, names, input shape) plus the payload's sizes and
    sha256, then the serialized program (zlib), the uint8 bits and the float32 weights."""
    program = zlib.compress(program, 9)
    payload = (program + np.ascontiguousarray(bits, np.uint8).tobytes()
               + np.ascontiguousarray(floats, "<f4").tobytes())
    header = dict(header, sizes=[len(program), int(bits.size), int(floats.size) * 4],
                  sha256=hashlib.sha256(payload).hexdigest())
    text = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(text), zlib.crc32(text)) + text + payload


def stored_sizes(blob: bytes) -> tuple[int, int, int]:
    """The stored byte sizes (program, bits, floats) a packed file's header declares."""
    header_len = _PREFIX.unpack_from(blob)[2]
    return tuple(json.loads(blob[_PREFIX.size:_PREFIX.size + header_len])["sizes"])


def read(path: str) -> tuple[dict, bytes, np.ndarray, np.ndarray]:
    """(header, serialized program, bits, floats) of a standalone model file, checked."""
    try:
        with open(path, "rb") as handle:
            blob = handle.read()
    except OSError as error:
        raise StandaloneError(f"cannot read model {path!r}: {error.strerror}") from None
    if len(blob) < _PREFIX.size or blob[:4] != MAGIC:
        raise StandaloneError(f"{path!r} is not a standalone cliquejax model (no CLQS header)")
    _, version, header_len, header_crc = _PREFIX.unpack_from(blob)
    if version != VERSION:
        raise StandaloneError(f"{path!r} has format version {version}; this program reads "
                              f"{VERSION}")
    try:
        text = blob[_PREFIX.size:_PREFIX.size + header_len]
        if len(text) != header_len or zlib.crc32(text) != header_crc:
            raise ValueError
        header = json.loads(text)
        program_len, bits_len, floats_len = (int(n) for n in header["sizes"])
        expected = header["sha256"]
        check_header(header)
    except (ValueError, KeyError, TypeError):
        raise StandaloneError(f"{path!r} is truncated or corrupt (unreadable header)") from None
    payload = blob[_PREFIX.size + header_len:]
    if (len(payload) != program_len + bits_len + floats_len
            or hashlib.sha256(payload).hexdigest() != expected):
        raise StandaloneError(f"{path!r} is truncated or corrupt (payload checksum mismatch)")
    bits = np.frombuffer(payload, np.uint8, bits_len, program_len)
    floats = np.frombuffer(payload, "<f4", floats_len // 4, program_len + bits_len)
    try:
        program = zlib.decompress(payload[:program_len])
    except zlib.error:
        raise StandaloneError(f"{path!r} is corrupt (its program does not decompress)") from None
    return header, program, bits, floats


def check_header(header) -> None:
    """ValueError unless the header's input shape (H, W, C) and class count are sane."""
    shape, classes = header["image_shape"], header["num_classes"]
    if not (isinstance(shape, list) and len(shape) == 3 and isinstance(classes, int)
            and all(isinstance(n, int) and n > 0 for n in [*shape, classes])):
        raise ValueError("bad image_shape or num_classes")


def check_images(images, image_shape) -> np.ndarray:
    """uint8 (N, H, W, C) from uint8 (N, H, W[, C]) of the model's input size, or an error."""
    images = np.asarray(images)
    shape = tuple(image_shape)
    if images.dtype != np.uint8:
        raise StandaloneError(f"images are {images.dtype}; allowed: uint8 pixel values 0..255 "
                              f"(the normalisation is inside the model)")
    given = images.shape
    if images.ndim == len(shape) and shape[-1] == 1:
        images = images[..., None]
    if images.ndim != len(shape) + 1 or images.shape[1:] != shape:
        raise StandaloneError(f"images have shape {given}; allowed: (N, {shape[0]}, "
                              f"{shape[1]}{', ' + str(shape[2]) if len(shape) > 2 else ''})")
    return images


def load(path: str):
    """`predict(uint8 images) -> float32 logits (N, classes)` of a standalone model file; also
    `.image_shape`, `.num_classes`, `.class_names` and `.exported`."""
    import jax

    header, program, bits, floats = read(path)
    try:
        exported = jax.export.deserialize(bytearray(program))
    except Exception as error:  # noqa: BLE001 - any failure means an unusable program
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise StandaloneError(f"{path!r}: its program cannot be read by jax "
                              f"{jax.__version__} ({type(error).__name__}: {first})") from None
    image_shape = tuple(header["image_shape"])
    call = jax.jit(exported.call)
    bits, floats = jax.device_put(bits), jax.device_put(floats)

    def predict(images):
        images = check_images(images, image_shape)
        try:
            return np.asarray(call(images, bits, floats))
        except Exception as error:  # noqa: BLE001 - a program that does not fit its header
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise StandaloneError(f"{path!r}: its program does not run on images of shape "
                                  f"{images.shape} ({first})") from None

    predict.image_shape, predict.num_classes = image_shape, header["num_classes"]
    predict.class_names, predict.exported = header.get("class_names"), exported
    return predict


def read_images(path: str) -> np.ndarray:
    """The `images` array of an .npz file."""
    allowed = "allowed: an .npz with images=uint8 N x H x W [x C]"
    try:
        loaded = np.load(path, allow_pickle=False)
    except OSError as error:
        raise StandaloneError(f"cannot read images {path!r}: "
                              f"{error.strerror or 'not an .npz file'}; {allowed}") from None
    except (ValueError, EOFError):  # a pickle, an empty or foreign file
        raise StandaloneError(f"cannot read images {path!r}: not an .npz file; "
                              f"{allowed}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise StandaloneError(f"{path!r} is a .npy array, not an .npz archive; {allowed} "
                              "(numpy.savez(path, images=...))")
    with loaded as archive:
        if "images" not in archive.files:
            raise StandaloneError(f"{path!r} has no 'images' array (it holds: "
                                  f"{', '.join(archive.files) or 'nothing'}); {allowed}")
        try:
            return archive["images"]
        except ValueError:  # object arrays are stored pickled
            raise StandaloneError(f"{path!r}: its 'images' array holds Python objects; "
                                  f"{allowed}") from None
        except (OSError, EOFError, zipfile.BadZipFile) as error:
            raise StandaloneError(f"cannot read images {path!r}: it is damaged "
                                  f"({type(error).__name__}); {allowed}") from None


def top_lines(logits: np.ndarray, labels: list[str], class_names=None, top: int = 1):
    """One line per image: its label, then the `top` classes (with names when known)."""
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :top]
    lines = []
    for label, classes in zip(labels, order, strict=True):
        named = [f"{c} ({class_names[c]})" if class_names and class_names[c] != str(c)
                 else str(c) for c in classes]
        lines.append(f"{label}\t" + "\t".join(named))
    return lines


def check_output(path: str | None) -> None:
    """Refuses a --logits path that cannot be a new file, before any work is done (an
    empty one was silently no file at all)."""
    if path is not None and not path.strip():
        raise StandaloneError(f"--logits={path!r} is empty; allowed: a file path in an "
                              "existing directory, or no --logits")
    if path and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
        raise StandaloneError(f"--logits={path!r}: allowed: a file path in an existing directory")


def save_logits(path: str, logits: np.ndarray) -> None:
    """np.save through a temporary file: an interrupted write keeps what `path` held."""
    path = path if path.endswith(".npy") else path + ".npy"  # where np.save writes
    temporary = f"{path}.{os.getpid()}.tmp.npy"
    try:
        np.save(temporary, logits)
        os.replace(temporary, path)
    except OSError as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise StandaloneError(f"--logits={path!r} cannot be written ({error.strerror})") from None


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr with exit code 2: every command of
    cliquejax uses it (defined here, where it must be for this file to run alone). `notes`:
    option -> text added to an error that names the option."""

    def __init__(self, *args, notes: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.notes = notes or {}

    def error(self, message):
        notes = "".join(f" ({note})" for option, note in self.notes.items() if option in message)
        print(f"error: {message}{notes}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> None:
    parser = OneLineParser(description="Top-1 classes of uint8 images from a standalone model.")
    parser.add_argument("model", help="the file written by cliquejax.export --format=standalone")
    parser.add_argument("images", help=".npz with images = uint8 N x H x W [x C]")
    parser.add_argument("--logits", help="also save the logits (N, classes) to this .npy")
    args = parser.parse_args(argv)
    try:
        check_output(args.logits)
        images = read_images(args.images)
        predict = load(args.model)
        logits = predict(images)
        if args.logits:
            save_logits(args.logits, logits)
    except StandaloneError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    labels = [str(i) for i in range(len(logits))]
    print("\n".join(top_lines(logits, labels, predict.class_names)))


if __name__ == "__main__":
    main()
