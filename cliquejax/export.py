"""The deployable MBCliqueNet files: 1 bit per binary weight, float32 for the rest.

    python -m cliquejax.export --workdir=runs/x --out=m.clqx                      # cliquejax
    python -m cliquejax.export --workdir=runs/x --out=m.clqs --format=standalone  # jax only

Both files take uint8 images (N, H, W, C) and normalise them inside with the training split's
per-channel mean and std, exactly as the training pipeline does, so they return the logits
the trained network gives on the data set's own images. A run with `data.augment=imagenet`
evaluates through a resize and centre crop on the host (PIL): the clqx file applies it
(`augment.eval_images`), a standalone file cannot and is refused for such a run.

`clqx` (`predict = cliquejax.export.load("m.clqx")`) needs this package: magic `CLQX`,
little-endian uint32 version, uint64 header length and uint32 CRC-32 of the header, a compact
JSON header (the model part of the config, input shape, classes, mean/std, the payload's
sha256, one row `[shape, kind, offset]` per variable in the order of the model's variable
tree and a hash of that tree's paths), then the payload: packed sign bits
(`binary.pack_signs`) of every binary weight, float32 bytes of everything else (M-filters,
BN parameters and statistics, float convs). The loader puts the
unpacked +-1 signs where the latent weights were: the network binarises on use and
sign(+-1) = +-1, so it computes exactly the trained network.

`standalone` (read by `cliquejax/standalone.py`, which needs only jax and numpy) holds a
serialized `jax.export.Exported` lowered for cpu, cuda and tpu with a symbolic batch size. Its
program takes (images uint8, bits uint8, floats float32), unpacks the bits with shifts and
masks into +-1 and runs the same network with each BN folded into one multiply-add
(`fold_batch_norms`); the file stores the weights once, as those two arrays. See
`cliquejax.standalone` for the layout.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import struct
import sys
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cliquejax import binary, bits, cli, models, names, standalone
from cliquejax.data import augment
from cliquejax.data.augment import normalize  # the training steps' arithmetic

MAGIC, VERSION = b"CLQX", 2
_PREFIX = struct.Struct("<4sIQI")  # magic, version, header length, header crc32
FORMATS = ("clqx", "standalone")


class ExportFileError(ValueError):
    pass


def binary_paths(config, info) -> set[str]:
    """Paths ("a/b/kernel") of the parameters stored as 1-bit signs, as the model's layers
    record them (`cliquejax.bits`): the one place export asks which leaves are binary."""
    model = models.build_model(config, info.num_classes)
    mask = bits.binary_mask(bits.abstract_variables(model, info.image_shape))
    leaves = jax.tree_util.tree_leaves_with_path(mask)
    return {names.path_string(p) for p, is_binary in leaves if is_binary}


def _binary_names(config, info) -> set[str]:
    return {"params/" + name for name in binary_paths(config, info)}


def _leaves(config, variables, info) -> list[tuple[np.ndarray, bool]]:
    """(value, is_binary) of every leaf of {"params", "batch_stats"}, in tree order."""
    binary_names = _binary_names(config, info)
    return [(np.asarray(leaf), names.path_string(path) in binary_names)
            for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(variables))]


def _tree_hash(variables) -> str:
    """A short hash of the variables' paths in tree order: the clqx table has no names, so
    this is what tells a file from another version of the model code."""
    leaves = jax.tree_util.tree_leaves_with_path(variables)
    paths = "\n".join(names.path_string(p) for p, _ in leaves)
    return hashlib.sha256(paths.encode()).hexdigest()[:16]


def _model_config(config) -> dict:
    """The part of the config that builds the network (and its compute dtype)."""
    train = {"compute_dtype": config.train.get("compute_dtype", "float32")} \
        if "train" in config else {}
    return {"model": json.loads(config.model.to_json_best_effort()), "train": train}


# --------------------------------------------------------------------------------- clqx


def serialize(config, variables, info, class_names=None) -> bytes:
    """The clqx file's bytes for trained `variables` ({"params", "batch_stats"}) of a run on
    the data set `info` (a `DatasetInfo`: shape, classes, mean, std)."""
    rows, chunks, offset = [], [], 0
    for leaf, is_binary in _leaves(config, variables, info):
        data = (binary.pack_signs(leaf)[0].tobytes() if is_binary
                else np.ascontiguousarray(leaf, dtype="<f4").tobytes())
        rows.append([list(leaf.shape), "b" if is_binary else "f", offset])
        chunks.append(data)
        offset += len(data)
    payload = b"".join(chunks)
    header = json.dumps({"config": _model_config(config), "image_shape": list(info.image_shape),
                         # the host's part of the evaluation view (`augment.eval_images`)
                         "eval_view": config.data.get("augment", "cifar"),
                         "num_classes": info.num_classes, "class_names": class_names,
                         "mean": list(info.mean), "std": list(info.std), "tensors": rows,
                         "tree": _tree_hash(variables),
                         "sha256": hashlib.sha256(payload).hexdigest()},
                        separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header), zlib.crc32(header)) + header + payload


def _read(path: str) -> tuple[dict, bytes]:
    try:
        with open(path, "rb") as handle:
            blob = handle.read()
    except OSError as error:
        raise ExportFileError(f"cannot read exported model {path!r}: {error.strerror}") from None
    if len(blob) < _PREFIX.size or blob[:4] != MAGIC:
        raise ExportFileError(f"{path!r} is not a cliquejax export (no CLQX header)")
    _, version, header_len, header_crc = _PREFIX.unpack_from(blob)
    if version != VERSION:
        raise ExportFileError(f"{path!r} has export version {version}; this code reads "
                              f"{VERSION} (export the run again)")
    try:
        text = blob[_PREFIX.size:_PREFIX.size + header_len]
        if len(text) != header_len or zlib.crc32(text) != header_crc:
            raise ValueError
        header = json.loads(text)
        expected = header["sha256"]
    except (ValueError, KeyError, TypeError):
        raise ExportFileError(f"{path!r} is truncated or corrupt (unreadable header)") from None
    payload = blob[_PREFIX.size + header_len:]
    if hashlib.sha256(payload).hexdigest() != expected:
        raise ExportFileError(f"{path!r} is truncated or corrupt (payload checksum mismatch)")
    return header, payload


def _tensor(shape, kind: str, offset: int, payload: bytes) -> np.ndarray:
    if kind == "b":
        size = binary.packed_nbytes(shape)
        return binary.unpack_signs(np.frombuffer(payload, np.uint8, size, offset), shape)
    return np.frombuffer(payload, "<f4", math.prod(shape), offset).reshape(shape).copy()


def load(path: str):
    """A jitted inference function `uint8 images (N, H, W[, C]) -> float32 logits` of the
    exported network; also `.image_shape`, `.num_classes` and `.class_names`. A run with
    data.augment=imagenet takes images of any size, resized and centre-cropped on the host
    as its evaluation did (`augment.eval_images`)."""
    header, payload = _read(path)
    try:
        standalone.check_header(header)
        config = ml_collections.ConfigDict(header["config"])
        image_shape = tuple(header["image_shape"])
        model = models.build_model(config, header["num_classes"])
        abstract = jax.eval_shape(lambda: model.init(
            jax.random.PRNGKey(0), jnp.zeros((1, *image_shape), jnp.float32)))
        rows = header["tensors"]
        mean, std = header["mean"], header["std"]
        view = augment.Augmentation(header.get("eval_view", "none"), False, 0, image_shape[0])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ExportFileError(f"{path!r}: its header does not describe a network this code "
                              f"builds ({cli.first_line(error, 200, typed=True)}); export the "
                              "run again") from None
    leaves, tree = jax.tree.flatten(abstract)
    if (header.get("tree") != _tree_hash(abstract) or len(rows) != len(leaves)
            or any(tuple(row[0]) != leaf.shape for row, leaf in zip(rows, leaves, strict=False))):
        raise ExportFileError(f"{path!r} does not hold the variables of the network its "
                              "header describes (export the run again with this code)")
    try:
        variables = jax.device_put(tree.unflatten([_tensor(*row, payload) for row in rows]))
    except (ValueError, TypeError) as error:  # a row pointing past the payload
        raise ExportFileError(f"{path!r} is corrupt ({cli.first_line(error, 200, typed=True)}); "
                              "export the run again") from None
    apply = jax.jit(lambda v, images: model.apply(v, normalize(images, mean, std), train=False))

    def predict(images):
        if view.needs_native_images:  # any size, resized and cropped as the run evaluated
            shape = np.shape(images)
            images = augment.eval_images(standalone.check_images(
                images, (*shape[1:3], image_shape[-1]) if len(shape) >= 3 else image_shape),
                view)
        return apply(variables, standalone.check_images(images, image_shape))

    predict.image_shape, predict.num_classes = image_shape, header["num_classes"]
    predict.class_names = header.get("class_names")
    return predict


# --------------------------------------------------------------------------- standalone


@functools.partial(jax.jit, static_argnums=2)
def _bn_multiplier(var, scale, epsilon: float):
    """rsqrt(var + eps) * scale as the network's eval-mode BN computes it (`ops.normalize`),
    so the folded multiplier is the very float32 the trained network multiplies by."""
    return jax.lax.rsqrt(var + epsilon) * scale


def fold_batch_norms(variables, epsilon: float) -> tuple[dict, dict]:
    """(values, constants) by path, every eval-mode BN (params {scale, bias} next to
    batch_stats {mean, var}) folded: (x - mean) * a + bias, a = rsqrt(var + eps) * scale,
    becomes x * a + b with b = bias - mean * a, so two vectors are stored instead of four
    (the size of the file is dominated by the BN vectors once the convs are 1-bit). `a` is
    the float32 the network itself computes, b is rounded once from float64; the logits
    differ from the checkpoint's by float32 rounding only. The network still runs its own BN
    code: its mean is a zero constant and its var the float32 V with V + eps == 1 exactly, so
    it computes x * 1 * a + b. Other leaves are returned unchanged."""
    flat = {names.path_string(p): np.asarray(leaf)
            for p, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(variables))}
    eps = np.float32(epsilon)
    unit_var = np.float32(1) - eps
    assert unit_var + eps == np.float32(1)
    values, constants = dict(flat), {}
    for name in flat:
        if not (name.startswith("batch_stats/") and name.endswith("/mean")):
            continue
        scope = name[len("batch_stats/"):-len("/mean")]
        keys = [f"params/{scope}/scale", f"params/{scope}/bias", f"batch_stats/{scope}/var"]
        if not all(k in flat for k in keys):
            continue
        mean, scale, bias, var = flat[name], *(flat[k] for k in keys)
        m = np.asarray(_bn_multiplier(var, scale, epsilon))
        values[keys[0]] = m
        offset = bias.astype(np.float64) - mean.astype(np.float64) * m.astype(np.float64)
        values[keys[1]] = offset.astype(np.float32)
        for key, constant in ((name, np.float32(0)), (keys[2], unit_var)):
            del values[key]
            constants[key] = np.full(flat[key].shape, constant, np.float32)
    return values, constants


def standalone_program(config, variables, info):
    """(Exported program, bits uint8, floats float32): the program maps (uint8 images with
    any batch size, bits, floats) to logits, lowered for cpu, cuda and tpu."""
    model = models.build_model(config, info.num_classes)
    values, constants = fold_batch_norms(variables, model.bn.epsilon)
    bits_at = _binary_names(config, info)
    paths = [names.path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(variables)]
    _, tree = jax.tree.flatten(variables)
    bit_chunks, float_chunks, layout = [], [], []
    bit_offset = float_offset = 0
    for name in paths:
        if name in constants:
            layout.append(("constant", constants[name], None))
        elif name in bits_at:
            packed = binary.pack_signs(values[name])[0]
            layout.append(("bits", bit_offset, values[name].shape))
            bit_chunks.append(packed)
            bit_offset += packed.size
        else:
            leaf = values[name]
            layout.append(("floats", float_offset, leaf.shape))
            float_chunks.append(np.asarray(leaf, np.float32).ravel())
            float_offset += leaf.size
    bits = np.concatenate(bit_chunks or [np.zeros(0, np.uint8)])
    floats = np.concatenate(float_chunks or [np.zeros(0, np.float32)])

    def leaf(kind, where, shape, bits, floats):
        if kind == "constant":
            return jnp.asarray(where)
        if kind == "bits":
            return standalone_unpack(bits, where, shape)
        return jax.lax.slice(floats, (where,), (where + math.prod(shape),)).reshape(shape)

    def forward(images, bits, floats):
        network = tree.unflatten([leaf(*entry, bits, floats) for entry in layout])
        return model.apply(network, normalize(images, info.mean, info.std), train=False)

    batch = jax.export.symbolic_shape("batch")[0]
    exported = jax.export.export(jax.jit(forward), platforms=standalone.PLATFORMS)(
        jax.ShapeDtypeStruct((batch, *info.image_shape), jnp.uint8),
        jax.ShapeDtypeStruct(bits.shape, jnp.uint8),
        jax.ShapeDtypeStruct(floats.shape, jnp.float32))
    return exported, bits, floats


def standalone_unpack(bits, offset: int, shape):
    """The +-1 float32 array of `shape` whose signs `binary.pack_signs` packed at
    bits[offset:]: bit 7 - j of byte i is element 8 i + j (numpy's big-endian bit order)."""
    size = math.prod(shape)
    packed = jax.lax.slice(bits, (offset,), (offset + binary.packed_nbytes(shape),))
    shifts = jnp.arange(7, -1, -1, dtype=jnp.uint8)
    flags = (packed[:, None] >> shifts[None, :]) & jnp.uint8(1)
    return jnp.where(flags.reshape(-1)[:size] == 1, 1.0, -1.0).astype(jnp.float32).reshape(shape)


def serialize_standalone(config, variables, info, class_names=None) -> tuple[bytes, dict]:
    """(the standalone file's bytes, its sizes: program, bits, floats, header, file)."""
    exported, bits, floats = standalone_program(config, variables, info)
    program = bytes(exported.serialize())
    blob = standalone.pack(program, bits, floats, {
        "num_classes": info.num_classes, "class_names": class_names,
        "image_shape": list(info.image_shape)})
    stored = standalone.stored_sizes(blob)
    sizes = {"program_bytes": len(program), "stored_program_bytes": stored[0],
             "bits_bytes": bits.nbytes, "floats_bytes": floats.nbytes, "file_bytes": len(blob)}
    sizes["header_bytes"] = len(blob) - sum(stored)
    return blob, sizes


# ------------------------------------------------------------------------ from a run


def restore(workdir: str, what: str = "export"):
    """(config, trainer holding the latest good checkpoint) of the run in `workdir`, from its
    own config.json and data.json (`evaluate.restore_trainer`: the data set itself is not
    read; creates nothing on disk, one-line errors, damaged checkpoints skipped)."""
    from cliquejax.train.evaluate import restore_trainer

    trainer = restore_trainer(None, os.path.expanduser(workdir), what, read_data=False)
    return trainer.config, trainer


def class_names(trainer):
    """The data set's label names as the run recorded them (data.json); for a run written
    before data.json, read from the data set when it has them (image folders, TFDS)."""
    if trainer.data_record is not None:
        return trainer.data_record.get("class_names")
    from cliquejax.data import info, sources

    try:
        return info.label_names(sources.load_source(trainer.config.data, "train"))
    except Exception:  # noqa: BLE001 - names are optional decoration
        return None


def write_atomically(path: str, blob: bytes, flag: str = "--out") -> None:
    """Writes `blob` to `path` through a temporary file: an interrupted or failed write
    leaves whatever `path` held before."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as handle:
            handle.write(blob)
        os.replace(temporary, path)
    except OSError as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise ValueError(f"{flag}={path!r} cannot be written ({error.strerror})") from None


def export_checkpoint(workdir: str, out: str, fmt: str = "clqx") -> dict:
    """Writes the latest checkpoint of `workdir` to `out` as `fmt`; returns sizes."""
    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt!r} is not one of: {', '.join(FORMATS)}")
    out = os.path.expanduser(out)
    if not out or os.path.isdir(out) or not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise ValueError(f"--out={out!r}: allowed: a file path in an existing directory")
    config, trainer = restore(workdir)
    if fmt == "standalone" and config.data.get("augment") == "imagenet":
        trainer.checkpoints.close()
        raise ValueError(f"--format=standalone: {workdir} evaluates with data.augment="
                         "'imagenet' (a resize and centre crop on the host, with PIL), which a "
                         "jax-only file cannot carry; allowed: --format=clqx")
    try:
        variables = {"params": trainer.state["params"],
                     "batch_stats": trainer.state["batch_stats"]}
        names = class_names(trainer)
        if fmt == "clqx":
            blob = serialize(config, variables, trainer.info, names)
            header_len = _PREFIX.unpack_from(blob)[2] + _PREFIX.size
            sizes = {"file_bytes": len(blob), "header_bytes": header_len,
                     "payload_bytes": len(blob) - header_len}
        else:
            blob, sizes = serialize_standalone(config, variables, trainer.info, names)
            sizes["packed_weight_bytes"] = sizes["bits_bytes"] + sizes["floats_bytes"]
        sizes["float32_model_bytes"] = 4 * sum(np.size(leaf) for leaf in jax.tree.leaves(variables))
        sizes["step"] = trainer.checkpoints.latest_step()
    finally:
        trainer.checkpoints.close()
    if jax.process_index() == 0:
        write_atomically(out, blob)
    return sizes


def describe_sizes(sizes: dict) -> str:
    kib = lambda n: f"{n / 1024:.1f} KiB"  # noqa: E731
    parts = [f"file {kib(sizes['file_bytes'])} ({sizes['file_bytes']} bytes)"]
    if "program_bytes" in sizes:
        parts += [f"packed weights {kib(sizes['packed_weight_bytes'])} "
                  f"(bits {sizes['bits_bytes']} + float32 {sizes['floats_bytes']} bytes)",
                  f"program {kib(sizes['program_bytes'])} "
                  f"(stored zlib-compressed: {kib(sizes['stored_program_bytes'])})",
                  f"header {sizes['header_bytes']} bytes"]
    else:
        parts += [f"payload {kib(sizes['payload_bytes'])}",
                  f"header {sizes['header_bytes']} bytes"]
    ratio = sizes["float32_model_bytes"] / sizes["file_bytes"]
    parts.append(f"float32 model {kib(sizes['float32_model_bytes'])} ({ratio:.1f}x the file)")
    return "; ".join(parts)


# commands that read a run directory take its config.json, never --config
NO_CONFIG = {"--config": "the run's own config.json is read from --workdir; no --config"}


def main(argv=None) -> None:
    parser = standalone.OneLineParser(
        prog="python -m cliquejax.export", notes=NO_CONFIG,
        description="Write a run's latest checkpoint as a deployable file.")
    parser.add_argument("--workdir", required=True, help="the run directory (config.json, "
                        "checkpoints/)")
    parser.add_argument("--out", required=True, help="the file to write")
    parser.add_argument("--format", default="clqx", choices=FORMATS,
                        help="clqx (cliquejax.export.load) or standalone (jax only)")
    args = parser.parse_args(argv)
    cli.quiet_logging()
    try:
        out = os.path.abspath(os.path.expanduser(args.out)) if args.out else args.out
        sizes = export_checkpoint(args.workdir, out, args.format)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {cli.first_line(error)}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out} ({args.format}, step {sizes['step']}): {describe_sizes(sizes)}")


if __name__ == "__main__":
    main()
