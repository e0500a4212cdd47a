"""The deployable MBCliqueNet file: 1 bit per binary weight, float32 for the rest.

    python -m cliquejax.export --config=configs/mbclique_digits.py --workdir=runs/x --out=m.clqx

    predict = cliquejax.export.load("m.clqx")   # jitted: images (N, H, W, C) -> logits

Layout: magic `CLQX`, a little-endian uint32 version and uint64 header length, a JSON header
(model config, input shape, classes, and per tensor: path, shape, kind, offset, size), then
the payload: packed sign bits (`binary.pack_signs`) of every binary weight, float32 bytes of
everything else (M-filters, BN parameters and statistics, float convs). The header holds the
payload's sha256, so a truncated or corrupted file is refused with a clear error.

Loading puts the unpacked +-1 signs where the latent weights were: the network binarises on
use, and sign(+-1) = +-1, so the loaded function computes exactly the trained network.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys

import jax
import ml_collections
import numpy as np

from cliquejax import binary, bits, models

MAGIC, VERSION = b"CLQX", 1
_PREFIX = struct.Struct("<4sIQ")


class ExportFileError(ValueError):
    pass


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _binary_paths(config, image_shape, num_classes: int) -> set[str]:
    """The parameters the model's layers store in 1 bit (`cliquejax.bits`)."""
    model = models.build_model(config, num_classes)
    mask = bits.binary_mask(bits.abstract_variables(model, image_shape))
    return {_path(p) for p, is_binary in jax.tree_util.tree_leaves_with_path(mask) if is_binary}


def serialize(config, variables, image_shape, num_classes: int) -> bytes:
    """The file's bytes for trained `variables` ({"params", "batch_stats"})."""
    binary_paths = _binary_paths(config, image_shape, num_classes)
    tensors, chunks, offset = [], [], 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(variables)):
        name = _path(path)
        kind = "bits" if name.split("/", 1)[1] in binary_paths else "float32"
        if kind == "bits":
            data = binary.pack_signs(leaf)[0].tobytes()
        else:
            data = np.ascontiguousarray(leaf, dtype="<f4").tobytes()
        tensors.append({"path": name, "shape": list(np.shape(leaf)), "kind": kind,
                        "offset": offset, "size": len(data)})
        chunks.append(data)
        offset += len(data)
    payload = b"".join(chunks)
    header = json.dumps({"config": json.loads(config.to_json_best_effort()),
                         "image_shape": list(image_shape), "num_classes": num_classes,
                         "tensors": tensors, "sha256": hashlib.sha256(payload).hexdigest()},
                        separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + payload


def _read(path: str) -> tuple[dict, bytes]:
    try:
        with open(path, "rb") as handle:
            blob = handle.read()
    except OSError as error:
        raise ExportFileError(f"cannot read exported model {path!r}: {error.strerror}") from None
    if len(blob) < _PREFIX.size or blob[:4] != MAGIC:
        raise ExportFileError(f"{path!r} is not a cliquejax export (no CLQX header)")
    _, version, header_len = _PREFIX.unpack_from(blob)
    if version != VERSION:
        raise ExportFileError(f"{path!r} has export version {version}; this code reads {VERSION}")
    try:
        header = json.loads(blob[_PREFIX.size:_PREFIX.size + header_len])
    except ValueError:
        raise ExportFileError(f"{path!r} has a corrupt header") from None
    payload = blob[_PREFIX.size + header_len:]
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise ExportFileError(f"{path!r} is truncated or corrupt (payload checksum mismatch)")
    return header, payload


def _tensor(entry: dict, payload: bytes) -> np.ndarray:
    raw = payload[entry["offset"]:entry["offset"] + entry["size"]]
    if entry["kind"] == "bits":
        return binary.unpack_signs(np.frombuffer(raw, np.uint8), entry["shape"])
    return np.frombuffer(raw, "<f4").reshape(entry["shape"]).copy()


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def load(path: str):
    """A jitted inference function `images -> logits` of the exported network."""
    header, payload = _read(path)
    config = ml_collections.ConfigDict(header["config"])
    model = models.build_model(config, header["num_classes"])
    variables = _nest({e["path"]: _tensor(e, payload) for e in header["tensors"]})
    apply = jax.jit(lambda v, images: model.apply(v, images, train=False))
    variables = jax.device_put(variables)

    def predict(images):
        return apply(variables, images)

    predict.image_shape, predict.num_classes = header["image_shape"], header["num_classes"]
    return predict


def export_checkpoint(config, workdir: str, out: str) -> dict:
    """Writes the latest checkpoint of `workdir` to `out`; returns sizes."""
    from cliquejax import report
    from cliquejax.train.evaluate import restore_trainer

    trainer = restore_trainer(config, workdir)
    variables = {"params": trainer.state["params"], "batch_stats": trainer.state["batch_stats"]}
    blob = serialize(config, variables, trainer.info.image_shape, trainer.info.num_classes)
    if jax.process_index() == 0:
        with open(out, "wb") as handle:
            handle.write(blob)
    header_len = _PREFIX.unpack_from(blob)[2] + _PREFIX.size
    sizes = {"file_bytes": len(blob), "header_bytes": header_len,
             "payload_bytes": len(blob) - header_len, "step": trainer.checkpoints.latest_step()}
    trainer.checkpoints.close()
    print(json.dumps(report.to_builtin(sizes)))
    return sizes


def main(argv) -> None:
    from absl import flags

    try:
        export_checkpoint(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.out)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "The run's config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "The run directory (its checkpoints/ are read).")
    flags.DEFINE_string("out", None, "The file to write.")
    flags.mark_flags_as_required(["config", "workdir", "out"])
    sys.path.insert(0, ".")
    app.run(main)
