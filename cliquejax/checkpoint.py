"""Checkpoints of the training state with Orbax, shape-checked restores, parameter fingerprints.

A checkpoint step directory holds two items: `state` (the pytree of arrays, written by every
process for its own shards) and `meta` (small JSON, written by the primary process). Orbax
writes each step into `<step>.orbax-checkpoint-tmp` and renames it on commit, so a save
killed half-way is never listed as a checkpoint.

Integrity: `meta` holds a checksum of the saved state (`STATE_CHECKSUM`, `state_checksum`),
checked after each restore, so flipped or lost bytes are an error instead of a silently
different network; `restore_good` falls back to the newest checkpoint that passes. The
checksum is computed on the device where the state lives (`state_checksum`: integer
arithmetic, the same bits on every backend), so a save reads 8 bytes per leaf back instead of
hashing the whole state on the host while the next step waits. Checkpoints written before
it hold the host's sha256 instead (`LEGACY_CHECKSUM`), still checked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from cliquejax import names

STATE_ITEM = "state"
META_ITEM = "meta"
STATE_CHECKSUM = "state_checksum"
LEGACY_CHECKSUM = "state_sha256"  # `params_fingerprint`, in checkpoints written before
CORRUPT_SUFFIX = "-corrupt"  # damaged checkpoints are moved to `<directory>-corrupt/<step>`
_ORBAX_SOURCE = f"{os.sep}orbax{os.sep}checkpoint{os.sep}"  # in Orbax's file paths


class CheckpointMismatchError(ValueError):
    """The tree stored in a checkpoint does not fit the tree it should be restored into."""


class CheckpointCorruptError(ValueError):
    """A checkpoint cannot be read, or its state does not match the checksum saved with it."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, permissions): the run cannot go on safely."""


class _DropOrbaxTracebacks(logging.Filter):
    """Orbax logs a failed background save with its traceback before the error reaches
    `check`/`wait`, which raise it as one line (CheckpointSaveError), and asyncio logs the
    reads of a damaged checkpoint that failed after the first one ended the restore (raised
    as one line, CheckpointCorruptError): drop these logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage() if record.name == "asyncio" else ""
        from_orbax = (_ORBAX_SOURCE in (record.pathname or "")
                      or _ORBAX_SOURCE in message  # its write tasks
                      or "in OCDBT database" in message)  # TensorStore's checkpoint reads
        return not (from_orbax and record.levelno >= logging.ERROR)


_ORBAX_FILTER = _DropOrbaxTracebacks()


def _quiet_orbax_leftovers_hook(previous):
    """Drops the unraisable errors Orbax leaves behind once a save or restore has failed
    and been raised as one line: TensorStore writes that finish after the failed save closed
    its event loop (`RuntimeError: Event loop is closed`), and the read coroutines of a
    damaged checkpoint that fail after the first failure ended the restore."""

    def hook(unraisable):
        value, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
        closed_loop = isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
        orbax_coroutine = code is not None and _ORBAX_SOURCE in code.co_filename
        if not (closed_loop or orbax_coroutine):
            previous(unraisable)

    hook.quiets_orbax_leftovers = True
    return hook


def _reason(error: BaseException) -> str:
    """One line a user can act on: the innermost OS error of the chain (disk full, no
    permission), else the first line of the innermost error (TensorStore's own cause)."""
    chain, current = [], error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    for item in reversed(chain):
        if isinstance(item, OSError) and item.strerror:
            return f"{item.strerror}: {item.filename}" if item.filename else item.strerror
    text = " ".join(str(error) for error in chain)
    for marker in ("File too large", "No space left on device", "Permission denied",
                   "Read-only file system", "Disk quota exceeded"):
        if marker in text:
            return marker
    lines = [line.strip() for line in str(chain[-1]).splitlines() if line.strip()]
    return (lines[0] if lines else type(chain[-1]).__name__)[:300]


class Checkpointer:
    """Saves and restores `(state, meta)` checkpoints in `directory`; with `read_only` it
    only restores (eval, predict, export), changing nothing on disk.

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
                 best_metric: str = "accuracy", create: bool = True, read_only: bool = False):
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
            # Only the writer (the process holding the run's lock) removes the temporary
            # directories of unfinished saves: a reader opening a live run would otherwise
            # delete the save in flight, and the writer would then die on it.
            cleanup_tmp_directories=not read_only,
            create=create and not read_only,
        )
        self.read_only = read_only
        for logger in ("absl", "asyncio"):
            logging.getLogger(logger).addFilter(_ORBAX_FILTER)  # once: filters are a set
        if not getattr(sys.unraisablehook, "quiets_orbax_leftovers", False):
            sys.unraisablehook = _quiet_orbax_leftovers_hook(sys.unraisablehook)
        self._pending_step = None
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

    def committed_steps(self) -> list[int]:
        """The steps on disk now (a save that failed is listed by Orbax until reloaded)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(name) for name in os.listdir(self.directory) if name.isdigit())

    def saving(self) -> bool:
        """Whether a save is still being written in the background."""
        return bool(self._manager.is_saving_in_progress())

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Starts saving `state` and `meta` as checkpoint `step`; returns whether it did.

        Without `force`, Orbax's save-decision policy may skip the step. A step that is not
        newer than the latest checkpoint, or that already exists, is never saved.
        """
        if self.read_only:
            raise CheckpointSaveError(f"{self.directory} was opened read-only")
        step = int(step)
        if step in self._manager.all_steps():
            return False
        metrics = None
        if self.keep_best and self.best_metric in meta:
            metrics = {self.best_metric: float(meta[self.best_metric])}
        meta = dict(meta, **{STATE_CHECKSUM: state_checksum(state)})
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                     META_ITEM: ocp.args.JsonSave(meta)})
        self.check()  # an earlier save that failed in the background stops here
        try:
            self._pending_step = step
            return self._manager.save(step, args=args, metrics=metrics, force=force)
        except CheckpointSaveError:
            raise
        except Exception as error:  # noqa: BLE001 - Orbax and TensorStore raise many types
            raise CheckpointSaveError(f"saving checkpoint step {step} in {self.directory} "
                                      f"failed ({_reason(error)})") from None

    def check(self) -> None:
        """Raises CheckpointSaveError if a save running in the background has failed."""
        # Orbax keeps a failed save's error on its finalize thread: once no save is in
        # progress, waiting returns at once, raising that error if there was one. A save
        # already waited for has nothing left to report: the step's loop pays nothing.
        if self._pending_step is not None and not self.saving():
            self.wait()

    def _save_error(self, error) -> CheckpointSaveError:
        return CheckpointSaveError(f"saving checkpoint step {self._pending_step} in "
                                   f"{self.directory} failed ({_reason(error)})")

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
        where = os.path.join(self.directory, str(step))
        try:
            saved = self._manager.metadata(step).item_metadata[STATE_ITEM]
        except Exception as error:  # noqa: BLE001 - whatever a damaged file raises
            raise CheckpointCorruptError(f"checkpoint {where} cannot be read "
                                         f"({_reason(error)})") from None
        if saved is None:
            raise CheckpointCorruptError(f"checkpoint {where} cannot be read (no state "
                                         "metadata)")
        differences = tree_differences(saved, target_state)
        if differences:
            raise CheckpointMismatchError(_mismatch_message(step, differences))
        abstract = jax.tree.map(_abstract_leaf, target_state)
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract),
                                     META_ITEM: ocp.args.JsonRestore()})
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as error:  # noqa: BLE001
            raise CheckpointCorruptError(f"checkpoint {where} cannot be read "
                                         f"({_reason(error)})") from None
        state, meta = restored[STATE_ITEM], dict(restored[META_ITEM] or {})
        expected = meta.pop(STATE_CHECKSUM, None)
        legacy = meta.pop(LEGACY_CHECKSUM, None)  # absent in checkpoints from before checksums
        if (expected is not None and state_checksum(state) != expected) or (
                legacy is not None and params_fingerprint(state) != legacy):
            raise CheckpointCorruptError(f"checkpoint {where} is corrupt (its state does not "
                                         "match the checksum saved with it)")
        return state, meta

    def restore_good(self, target_state, warn, *, move_aside: bool = False):
        """`(state, meta)` of the newest checkpoint that reads and passes its checksum.

        Each damaged one is reported through `warn(message)` (one line) and, with
        `move_aside`, moved to `<directory>-corrupt/<step>` (never deleted) so its step can
        be saved again. Raises CheckpointCorruptError when no checkpoint is good and
        FileNotFoundError when there is none; a tree that does not fit still raises
        CheckpointMismatchError.
        """
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        bad = []
        for step in reversed(steps):
            try:
                restored = self.restore(target_state, step)
            except CheckpointCorruptError as error:
                bad.append(step)
                earlier = [s for s in steps if s < step]
                then = f"falling back to step {earlier[-1]}" if earlier else "none left"
                warn(f"warning: {error}; {then}")
                continue
            if move_aside:
                self.move_aside(bad)
            return restored
        listed = ", ".join(str(s) for s in reversed(bad))
        raise CheckpointCorruptError(
            f"no good checkpoint in {self.directory} (steps {listed} are damaged); start "
            "anew with --overwrite (the run is moved aside) or another --workdir")

    def move_aside(self, steps) -> None:
        """Moves checkpoints `steps` to `<directory>-corrupt/` (primary process only; a
        read-only Checkpointer leaves them where they are)."""
        if steps and jax.process_index() == 0 and not self.read_only:
            aside = self.directory + CORRUPT_SUFFIX
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target = os.path.join(aside, str(step))
                suffix = 1
                while os.path.exists(target):
                    target, suffix = os.path.join(aside, f"{step}.{suffix}"), suffix + 1
                shutil.move(os.path.join(self.directory, str(step)), target)
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending saves are committed (and old checkpoints deleted); raises
        CheckpointSaveError if one failed."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as error:  # noqa: BLE001
            raise self._save_error(error) from None
        self._pending_step = None

    def close(self) -> None:
        self.wait()
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


def _leaf_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    specs = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            leaf = np.asarray(leaf)
        shape = tuple(int(n) for n in leaf.shape)
        specs[names.path_string(path)] = (shape, str(np.dtype(leaf.dtype)))
    return specs


def tree_differences(saved, target) -> list[str]:
    """Short descriptions of how the leaves of `saved` and `target` differ, target order first.

    Leaves are compared by path (see `names.path_string`; namedtuple fields, dict keys and sequence
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


_CHECKSUM_MULTIPLIER = np.uint32(0x9E3779B1)  # odd: any change of one word changes its lane


def _leaf_words(leaf):
    """A leaf's raw bits as uint32 words (narrower types widened, wider ones split)."""
    import jax.numpy as jnp

    size = np.dtype(leaf.dtype).itemsize
    if leaf.dtype == jnp.bool_:
        return leaf.astype(jnp.uint32).reshape(-1)
    if size < 4:
        unsigned = jnp.dtype(f"uint{8 * size}")
        return jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32).reshape(-1)
    return jax.lax.bitcast_convert_type(leaf, jnp.uint32).reshape(-1)  # 8 bytes: 2 words


def _leaf_lanes(leaf):
    """Two uint32 sums of a leaf's words w_i, modulo 2^32: sum (2i + 1) w_i (odd weights:
    every change of one word, any single-bit flip included, changes it) and a second lane
    of the words rotated by 13 bits under odd weights hashed from i."""
    import jax.numpy as jnp

    words = _leaf_words(leaf)
    index = jnp.arange(words.shape[0], dtype=jnp.uint32)
    odd = index * jnp.uint32(2) + jnp.uint32(1)
    rotated = (words << jnp.uint32(13)) | (words >> jnp.uint32(19))
    mixed = (index ^ jnp.uint32(0x5BD1E995)) * _CHECKSUM_MULTIPLIER | jnp.uint32(1)
    return jnp.stack([jnp.sum(words * odd, dtype=jnp.uint32),
                      jnp.sum(rotated * mixed, dtype=jnp.uint32)])


@jax.jit
def _device_lanes(tree):
    return [_leaf_lanes(leaf) for leaf in jax.tree.leaves(tree)]


def state_checksum(tree) -> str:
    """Hex checksum of every leaf's key path, dtype, shape and bits: two 32-bit lanes per
    leaf computed where the leaf lives (`_leaf_lanes`), hashed on the host with the leaves'
    descriptions. Any single-bit change of a leaf changes it; it is not a cryptographic
    hash (`params_fingerprint` is the digest of a finished run)."""
    leaves = [(path, leaf if hasattr(leaf, "dtype") else np.asarray(leaf))
              for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
    # A replicated leaf's copy on this process: the lanes are a program of this process
    # alone, and every process hashes the same bytes.
    local = [leaf.addressable_data(0) if isinstance(leaf, jax.Array) and
             not leaf.is_fully_addressable and leaf.is_fully_replicated else leaf
             for _, leaf in leaves]
    lanes = jax.device_get([lane if lane.is_fully_addressable else lane.addressable_data(0)
                            for lane in _device_lanes(local)])
    digest = hashlib.sha256()
    for (path, leaf), lane in zip(leaves, lanes, strict=True):
        header = f"{jax.tree_util.keystr(path)}|{np.dtype(leaf.dtype)}|{tuple(leaf.shape)}|"
        digest.update(len(header).to_bytes(8, "little") + header.encode())
        digest.update(np.asarray(lane, "<u4").tobytes())
    return digest.hexdigest()
