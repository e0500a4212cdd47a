"""Checkpointer, tree comparison and parameter fingerprints, with real Orbax on tmp_path."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

from cliquejax.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    CheckpointSaveError,
    params_fingerprint,
    state_checksum,
    tree_differences,
)

# Orbax (0.12.8, orbax/checkpoint/_src/path/atomicity.py) writes step N into this
# directory and renames it to `N` on commit; older releases appended `-<timestamp>`.
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def make_params(kernel_shape=(3, 3, 2, 4), seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return {
        "conv": {"kernel": jax.random.normal(keys[0], kernel_shape)},
        "dense": {"kernel": jax.random.normal(keys[1], (4, 5)),
                  "bias": jax.random.normal(keys[2], (5,)).astype(jnp.bfloat16)},
    }


def make_state(optimizer=None, kernel_shape=(3, 3, 2, 4), step=7):
    params = make_params(kernel_shape)
    optimizer = optimizer or optax.sgd(0.1, momentum=0.9)
    opt_state = optimizer.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return {"step": jnp.asarray(step, jnp.int32),
            "params": optax.apply_updates(params, updates),
            "batch_stats": {"bn": {"mean": jnp.arange(4.0), "var": jnp.ones(4)}},
            "opt_state": opt_state}


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


def assert_bitwise_equal(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


def snapshot(directory):
    """Every file under `directory` with the sha256 of its contents."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, directory)] = hashlib.sha256(handle.read()).hexdigest()
    return files


def test_round_trip_is_bitwise_and_survives_a_restart(tmp_path):
    state = make_state()
    meta = {"epoch": 3, "step": 7, "best_accuracy": 0.5, "config_fingerprint": "abc",
            "best_loss": None, "final": {"accuracy": 0.5}}
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        assert checkpointer.latest_step() is None
        assert checkpointer.save(7, state, meta)
        checkpointer.wait()
        assert checkpointer.latest_step() == 7 and checkpointer.all_steps() == [7]
        restored, restored_meta = checkpointer.restore(state)
    assert_bitwise_equal(restored, state)
    assert restored_meta == meta
    with Checkpointer(tmp_path / "ckpt") as reopened:
        assert reopened.latest_step() == 7
        restored, restored_meta = reopened.restore(abstract(state), step=7)
    assert_bitwise_equal(restored, state)
    assert restored_meta == meta


def test_existing_or_missing_steps(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(FileNotFoundError):
            checkpointer.restore(state)
        assert checkpointer.save(7, state, {"step": 7})
        assert not checkpointer.save(7, state, {"step": 7}, force=True)
        with pytest.raises(FileNotFoundError, match="step 3"):
            checkpointer.restore(state, step=3)


def test_retention_keeps_the_latest_and_the_best(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, keep=2) as checkpointer:
        for step, accuracy in zip(range(1, 6), [0.1, 0.9, 0.2, 0.3, 0.4], strict=True):
            checkpointer.save(step, state, {"step": step, "accuracy": accuracy})
        checkpointer.wait()
        assert checkpointer.all_steps() == [2, 4, 5]
    assert sorted(os.listdir(tmp_path)) == ["2", "4", "5"]
    with Checkpointer(tmp_path, keep=2) as reopened:
        reopened.save(6, state, {"step": 6, "accuracy": 0.5})
        reopened.save(7, state, {"step": 7})
        reopened.wait()
        assert reopened.all_steps() == [2, 6, 7]


def test_retention_without_best(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, keep=1, keep_best=False) as checkpointer:
        for step, accuracy in [(1, 0.9), (2, 0.1)]:
            checkpointer.save(step, state, {"accuracy": accuracy})
        checkpointer.wait()
        assert checkpointer.all_steps() == [2]


def test_shape_mismatch_is_one_line_and_changes_nothing(tmp_path):
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(40, make_state(), {"step": 40})
        checkpointer.wait()
        before = snapshot(tmp_path)
        target = abstract(make_state(kernel_shape=(3, 3, 2, 6)))
        with pytest.raises(CheckpointMismatchError) as raised:
            checkpointer.restore(target)
        assert snapshot(tmp_path) == before
    message = str(raised.value)
    assert "\n" not in message
    # Leaves come in flatten order (sorted keys): the momentum trace before the params.
    assert message == ("checkpoint step 40 does not fit the configuration: "
                       "opt_state/0/trace/conv/kernel has shape (3, 3, 2, 4) in the checkpoint, "
                       "(3, 3, 2, 6) now; 1 more difference")
    assert tree_differences(make_state(), target)[1] == (
        "params/conv/kernel has shape (3, 3, 2, 4) in the checkpoint, (3, 3, 2, 6) now")
    assert isinstance(raised.value, ValueError)


def test_optimizer_mismatch_names_a_path_and_changes_nothing(tmp_path):
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(5, make_state(), {"step": 5})
        checkpointer.wait()
        before = snapshot(tmp_path)
        with pytest.raises(CheckpointMismatchError) as raised:
            checkpointer.restore(make_state(optimizer=optax.adam(1e-3)))
        assert snapshot(tmp_path) == before
        assert checkpointer.all_steps() == [5]
    message = str(raised.value)
    assert "\n" not in message
    assert "opt_state/0/count missing in the checkpoint; " in message
    assert message.endswith("more differences")


def test_tree_differences_reports_every_kind():
    saved = {"a": jax.ShapeDtypeStruct((2,), jnp.float32),
             "b": jax.ShapeDtypeStruct((3,), jnp.float32),
             "gone": jax.ShapeDtypeStruct((), jnp.int32)}
    target = {"a": np.zeros(2, np.float16), "b": jnp.zeros((4,)), "new": 1.0}
    assert tree_differences(saved, target) == [
        "a has dtype float32 in the checkpoint, float16 now",
        "b has shape (3,) in the checkpoint, (4,) now",
        "new missing in the checkpoint",
        "gone only in the checkpoint, not expected now",
    ]
    assert tree_differences(target, target) == []


@pytest.mark.parametrize("suffix", ["", "-1712345678"])
def test_uncommitted_leftover_is_ignored(tmp_path, suffix):
    state = make_state()
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, state, {"step": 1})
    # What a kill during the save of step 2 leaves (seen with orbax 0.12.8): the step and its
    # items in tmp directories, no commit_success.txt.
    leftover = tmp_path / f"2{TMP_SUFFIX}{suffix}"
    shutil.copytree(tmp_path / "1", leftover)
    os.remove(leftover / "commit_success.txt")
    os.rename(leftover / "state", leftover / f"state{TMP_SUFFIX}")
    shutil.rmtree(leftover / "meta")
    os.mkdir(leftover / f"meta{TMP_SUFFIX}")
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.latest_step() == 1 and checkpointer.all_steps() == [1]
        _, meta = checkpointer.restore(state)
        assert meta == {"step": 1}
        assert checkpointer.save(2, state, {"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    with Checkpointer(tmp_path) as reopened:
        assert reopened.all_steps() == [1, 2]
        restored, meta = reopened.restore(state)
    assert meta == {"step": 2}
    assert_bitwise_equal(restored, state)


SAVE_AND_HANG = """
import sys
import jax.numpy as jnp
from cliquejax.checkpoint import Checkpointer
checkpointer = Checkpointer(sys.argv[1])
checkpointer.save(1, {"w": jnp.zeros((32, 1024, 1024))}, {"step": 1})
checkpointer.wait()
print("saved", flush=True)
checkpointer.save(2, {"w": jnp.ones((32, 1024, 1024))}, {"step": 2})
checkpointer.wait()
"""


def kill_during_second_save(directory):
    """Runs SAVE_AND_HANG and SIGKILLs it as soon as step 2's tmp directory appears."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    process = subprocess.Popen([sys.executable, "-c", SAVE_AND_HANG, str(directory)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        assert process.stdout.readline().strip() == b"saved"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not os.path.exists(directory / f"2{TMP_SUFFIX}"):
            time.sleep(0.001)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


@pytest.mark.slow
def test_save_killed_midway_is_ignored(tmp_path):
    kill_during_second_save(tmp_path)
    if os.path.exists(tmp_path / "2"):
        pytest.skip("the save committed before the kill")
    assert f"2{TMP_SUFFIX}" in os.listdir(tmp_path)
    state = {"w": jnp.zeros((32, 1024, 1024))}
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.all_steps() == [1]
        assert checkpointer.restore(state)[1] == {"step": 1}
        assert checkpointer.save(2, {"w": jnp.ones((32, 1024, 1024))}, {"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_restore_onto_a_sharding(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(3, state, {})
        device = jax.devices()[-1]
        sharding = jax.sharding.SingleDeviceSharding(device)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                              state)
        restored, _ = checkpointer.restore(target)
    for leaf in jax.tree.leaves(restored):
        assert isinstance(leaf, jax.Array)
        assert leaf.sharding == sharding and leaf.devices() == {device}
    assert_bitwise_equal(restored, state)


def test_fingerprint_equal_content_equal_digest():
    tree = {"params": make_params(), "batch_stats": {"bn": {"mean": jnp.arange(4.0)}}}
    copy = jax.tree.map(lambda x: jnp.array(np.asarray(x)), tree)
    reordered = {"batch_stats": FrozenDict({"bn": {"mean": jnp.arange(4.0)}}),
                 "params": {name: tree["params"][name] for name in ["dense", "conv"]}}
    digest = params_fingerprint(tree)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert params_fingerprint(copy) == digest
    # Relies on jax flattening dicts and flax FrozenDicts in sorted key order.
    assert params_fingerprint(reordered) == digest


def test_fingerprint_changes_with_one_bit_dtype_or_name():
    tree = {"params": make_params()}
    digest = params_fingerprint(tree)
    kernel = np.array(tree["params"]["dense"]["kernel"])
    flipped = kernel.view(np.uint32).copy()
    flipped[2, 3] ^= 1
    changed = {"params": dict(tree["params"], dense=dict(tree["params"]["dense"],
                                                         kernel=flipped.view(np.float32)))}
    assert params_fingerprint(changed) != digest
    as_int = {"params": dict(tree["params"], dense=dict(tree["params"]["dense"],
                                                        kernel=kernel.view(np.int32)))}
    assert params_fingerprint(as_int) != digest
    renamed = {"params": {"conv2": tree["params"]["conv"], "dense": tree["params"]["dense"]}}
    assert params_fingerprint(renamed) != digest


def test_state_checksum_changes_with_every_single_bit_and_nothing_else():
    tree = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "step": jnp.array(7, jnp.int32),
            "half": jnp.linspace(0.0, 2.0, 5).astype(jnp.bfloat16),
            "count": jnp.arange(3, dtype=jnp.uint8)}
    digest = state_checksum(tree)
    assert state_checksum(jax.device_get(tree)) == digest  # on the host: the same bits
    seen = {digest}
    for name in ("w", "step", "half", "count"):
        value = np.asarray(tree[name])
        words = value.reshape(-1).view(f"uint{8 * value.itemsize}")
        for word in range(words.size):
            for bit in range(8 * value.itemsize):
                flipped = words.copy()
                flipped[word] ^= flipped.dtype.type(1 << bit)
                changed = dict(tree, **{name: flipped.view(value.dtype).reshape(value.shape)})
                seen.add(state_checksum(changed))
    assert len(seen) == 1 + 12 * 32 + 32 + 5 * 16 + 3 * 8  # every flip its own checksum
    swapped = np.asarray(tree["w"]).copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    assert state_checksum(dict(tree, w=swapped)) != digest  # the order of the words counts
    assert state_checksum(dict(tree, w=np.asarray(tree["w"]).view(np.int32))) != digest
    assert state_checksum({"v": tree["w"], **{k: tree[k] for k in tree if k != "w"}}) != digest


def test_a_read_only_checkpointer_changes_nothing(tmp_path):
    """What eval, predict and export open: a save in flight (its temporary directory) is
    left to the writer, which alone cleans up; nothing can be saved or moved aside."""
    state = make_state()
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(7, state, {"step": 7})
    leftover = tmp_path / f"8{TMP_SUFFIX}"  # a save in flight: items written, no commit
    shutil.copytree(tmp_path / "7", leftover)
    os.remove(leftover / "commit_success.txt")
    os.rename(leftover / "state", leftover / f"state{TMP_SUFFIX}")
    before = sorted(os.listdir(tmp_path))
    reader = Checkpointer(tmp_path, read_only=True)
    restored, _ = reader.restore(state)
    assert_bitwise_equal(restored, state)
    with pytest.raises(CheckpointSaveError, match="opened read-only"):
        reader.save(9, state, {"step": 9})
    reader.move_aside([7])
    reader.close()
    assert sorted(os.listdir(tmp_path)) == before
    with Checkpointer(tmp_path) as writer:  # the writer removes it (before its next save)
        writer.save(9, state, {"step": 9})
    assert sorted(os.listdir(tmp_path)) == ["7", "9"]
