"""Checkpoints of the training state with Orbax, shape-checked restores, parameter fingerprints.

A checkpoint step directory holds two items: `state` (the pytree of arrays, written by every
process for its own shards) and `meta` (small JSON, written by the primary process). Orbax
writes each step into `<step>.orbax-checkpoint-tmp` and renames it on commit, so a save
killed half-way is never listed as a checkpoint.
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

STATE_ITEM = "state"
META_ITEM = "meta"


class CheckpointMismatchError(ValueError):
    """The tree stored in a checkpoint does not fit the tree it should be restored into."""


class Checkpointer:
    """Saves and restores `(state, meta)` checkpoints in `directory`.

    Retention: the last `keep` checkpoints are kept, plus (with `keep_best`) the one with the
    highest `meta[best_metric]`; checkpoints whose meta lacks that metric are only kept as
    recent ones.

    Multi-process: every process must call `save`, `restore`, `wait` and `close` with the
    same arguments (the state being globally sharded arrays); Orbax synchronises the
    processes and has each one write its own shards. Never guard these calls with
    `jax.process_index() == 0`: the other processes would wait for it forever.

    Saving is asynchronous: call `wait()` (or `close()`) before the program exits.
    """

    def __init__(self, directory, *, keep: int = 2, keep_best: bool = True,
                 best_metric: str = "accuracy"):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.best_metric = best_metric
        self.keep_best = keep_best
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_retention_policy(keep, keep_best, best_metric),
            # best_fn is what makes Orbax write the metrics the BestN policy ranks, so the
            # best checkpoint is still known after a restart.
            best_fn=_metric_getter(best_metric) if keep_best else None,
            best_mode="max",
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                           META_ITEM: ocp.JsonCheckpointHandler()},
            options=options,
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Starts saving `state` and `meta` as checkpoint `step`; returns whether it did.

        Without `force`, Orbax's save-decision policy may skip the step. A step that is not
        newer than the latest checkpoint, or that already exists, is never saved.
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        metrics = None
        if self.keep_best and self.best_metric in meta:
            metrics = {self.best_metric: float(meta[self.best_metric])}
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                     META_ITEM: ocp.args.JsonSave(dict(meta))})
        return self._manager.save(step, args=args, metrics=metrics, force=force)

    def restore(self, target_state, step: int | None = None):
        """Returns `(state, meta)` of checkpoint `step` (default: the latest).

        The state gets the structure, shapes, dtypes and shardings of `target_state`, a pytree
        of jax arrays or `jax.ShapeDtypeStruct`s. Raises CheckpointMismatchError, before
        reading any array, when the stored tree differs from it in paths, shapes or dtypes.
        """
        self.wait()
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}")
        saved = self._manager.metadata(step).item_metadata[STATE_ITEM]
        differences = tree_differences(saved, target_state)
        if differences:
            raise CheckpointMismatchError(_mismatch_message(step, differences))
        abstract = jax.tree.map(_abstract_leaf, target_state)
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract),
                                     META_ITEM: ocp.args.JsonRestore()})
        restored = self._manager.restore(step, args=args)
        return restored[STATE_ITEM], dict(restored[META_ITEM])

    def wait(self) -> None:
        """Blocks until pending saves are committed (and old checkpoints deleted)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _metric_getter(name: str):
    return lambda metrics: float(metrics[name])


def _retention_policy(keep: int, keep_best: bool, best_metric: str):
    policies = [checkpoint_managers.LatestN(n=keep)]
    if keep_best:
        # BestN sorts ascending and keeps the last n: the highest metric.
        policies.append(checkpoint_managers.BestN(
            get_metric_fn=_metric_getter(best_metric), n=1,
            keep_checkpoints_without_metrics=False))
    return checkpoint_managers.AnyPreservationPolicy(policies)


def _abstract_leaf(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf


def _mismatch_message(step: int, differences: list[str]) -> str:
    message = f"checkpoint step {step} does not fit the configuration: {differences[0]}"
    more = len(differences) - 1
    if more:
        message += f"; {more} more difference{'s' if more > 1 else ''}"
    return message


def path_string(path) -> str:
    """`opt_state/0/trace/conv/kernel`: one name per level, whatever the container type."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _leaf_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    specs = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            leaf = np.asarray(leaf)
        specs[path_string(path)] = (tuple(int(n) for n in leaf.shape), str(np.dtype(leaf.dtype)))
    return specs


def tree_differences(saved, target) -> list[str]:
    """Short descriptions of how the leaves of `saved` and `target` differ, target order first.

    Leaves are compared by path (see `path_string`; namedtuple fields, dict keys and sequence
    indices are all plain names, as Orbax stores them), shape and dtype. Leaves may be arrays,
    `jax.ShapeDtypeStruct`s or Orbax array metadata.
    """
    saved_specs, target_specs = _leaf_specs(saved), _leaf_specs(target)
    differences = []
    for path, (shape, dtype) in target_specs.items():
        if path not in saved_specs:
            differences.append(f"{path} missing in the checkpoint")
            continue
        saved_shape, saved_dtype = saved_specs[path]
        if saved_shape != shape:
            differences.append(f"{path} has shape {saved_shape} in the checkpoint, {shape} now")
        if saved_dtype != dtype:
            differences.append(f"{path} has dtype {saved_dtype} in the checkpoint, {dtype} now")
    differences += [f"{path} only in the checkpoint, not expected now"
                    for path in saved_specs if path not in target_specs]
    return differences


def _host_value(leaf) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if not leaf.is_fully_replicated:
            raise ValueError("params_fingerprint needs fully replicated arrays, got sharding "
                             f"{leaf.sharding} for shape {leaf.shape}")
        leaf = leaf.addressable_data(0)
    return np.ascontiguousarray(np.asarray(jax.device_get(leaf)))


def params_fingerprint(tree) -> str:
    """sha256 hex digest of every leaf's key path, dtype, shape and raw bytes.

    Leaves are taken in `jax.tree_util.tree_flatten_with_path` order, which sorts the keys of
    dicts and flax FrozenDicts, so equal content gives the same digest whatever the
    insertion order; any single-bit change of a leaf changes it.
    """
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        value = _host_value(leaf)
        header = f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|".encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        digest.update(value.tobytes())
    return digest.hexdigest()
