"""Compute precision and rematerialisation (`config.train.remat`, `config.train.compute_dtype`):
remat "layer" / "block" change what the backward pass stores, never the values: the same
loss, gradients and new BatchNorm statistics as "none" in a real (jitted) training step.
float32 compute is the default; bfloat16 compute learns on the digits, and the parameters and
optimizer state stay float32."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cliquejax import checkpoint, clique, data
from cliquejax.models import build_model
from cliquejax.train import loop, optim, step
from configs import cliquenet_cifar10
from tests.conftest import tiny_digits_config
from tests.test_clique import random_block

TOLERANCE = 1e-5  # float32; remat only changes the order of some float32 sums


def cliquenet_config():
    config = cliquenet_cifar10.get_config()  # dropout 0.2: the dropout rngs are exercised
    config.model.k, config.model.T = 4, 6
    config.data.name = "digits"
    return config


def mbcliquenet_config():
    return tiny_digits_config()  # widths 16, 16, 32; layers 2, 2, 2; no dropout


CONFIGS = {"cliquenet": cliquenet_config, "mbcliquenet": mbcliquenet_config}


@functools.cache
def digits_batch(size: int = 32):
    config = tiny_digits_config()
    batch = next(data.make_train_iterator(config.data, global_batch_size=size, seed=0))
    info = data.dataset_info(config.data)
    train_view, _ = loop.device_views(config, info.image_shape, info.mean, info.std)
    return train_view(batch)  # the network's input, as the jitted step makes it


TRANSFORMS = (optax.sgd(1.0),)  # plain SGD with learning rate 1: the update is -gradient


@functools.cache
def initial_state(name: str):
    """Shared by every remat policy: the parameters do not depend on it (init is the slow
    compile here)."""
    model = build_model(CONFIGS[name](), 10)
    return jax.jit(lambda: step.init_state(model, TRANSFORMS, (8, 8, 1), seed=0))()


def jitted_train_step(model):
    return jax.jit(functools.partial(step.train_step, model=model, transforms=TRANSFORMS,
                                     schedule=optax.constant_schedule(1.0), seed=0))


@functools.cache
def one_step(name: str, remat: str):
    """(loss, gradient, new batch stats) of one jitted `step.train_step` on a digits batch."""
    config = CONFIGS[name]()
    config.train.remat = remat
    model, state = build_model(config, 10), initial_state(name)
    new, metrics = jitted_train_step(model)(state, digits_batch())
    grads = jax.tree.map(lambda old, updated: old - updated, state["params"], new["params"])
    assert float(metrics["finite"]) == 1.0
    return jax.device_get((metrics["loss"], grads, new["batch_stats"]))


def assert_trees_close(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual),
                            jax.tree.leaves(expected), strict=True):
        scale = max(1.0, float(np.max(np.abs(b))))  # a leaf's gradients share one scale
        np.testing.assert_allclose(a, b, rtol=TOLERANCE, atol=TOLERANCE * scale,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # whole models; the fast tier keeps the block-level test below
@pytest.mark.parametrize("remat", ["layer", "block", "layer_keep_1x1"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_remat_changes_no_value(name, remat):
    loss, grads, stats = one_step(name, "none")
    remat_loss, remat_grads, remat_stats = one_step(name, remat)
    np.testing.assert_allclose(remat_loss, loss, rtol=TOLERANCE)
    assert_trees_close(remat_grads, grads)
    assert_trees_close(remat_stats, stats)
    moved = jax.tree.map(lambda a: float(np.max(np.abs(a))), grads)
    assert max(jax.tree.leaves(moved)) > 0


# The unrolled form with dropout is the CliqueNet case above; the loop form, with its
# checkpointed loop body, is only here.
@pytest.mark.parametrize("unroll,dropout", [
    pytest.param(True, 0.0, marks=pytest.mark.slow), (False, 0.2)], ids=["unrolled", "loop"])
def test_block_remat_in_both_forms(unroll, dropout):
    """The pure clique block (bottleneck): outputs, new statistics and gradients."""
    spec = clique.BlockSpec(in_channels=5, channels=4, num_layers=3, bottleneck=True,
                            dropout_rate=dropout, unroll=unroll)
    params, stats = random_block(spec)
    x0 = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 5))

    def run(remat):
        def loss(p, x):
            block, transit, new_stats = clique.clique_block(
                p, stats, x, jax.random.PRNGKey(7), True, dataclasses.replace(spec, remat=remat))
            return jnp.mean(block**2) + jnp.mean(jnp.sin(transit)), (block, transit, new_stats)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x0)

    reference = run("none")
    for remat in ("layer", "block"):
        assert_trees_close(run(remat), reference)


def test_bad_remat_is_a_one_line_error():
    config = cliquenet_config()
    config.train.remat = "everything"
    with pytest.raises(ValueError) as error:
        build_model(config, 10)
    message = str(error.value)
    assert "train.remat='everything'" in message and "\n" not in message
    assert all(policy in message for policy in ("none", "layer", "block"))


def test_float32_compute_is_the_default():
    default, explicit = cliquenet_config(), cliquenet_config()
    explicit.train.compute_dtype = "float32"
    for config in (default, explicit):  # dropout makes compiling slower
        config.model.dropout_rate = 0.0
    models = [build_model(config, 10) for config in (default, explicit)]
    assert models[0] == models[1] and models[0].dtype is None
    state, images = initial_state("cliquenet"), digits_batch()["image"]
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    outputs = [jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        variables, images) for model in models]
    for a, b in zip(jax.tree.leaves(outputs[0]), jax.tree.leaves(outputs[1]), strict=True):
        np.testing.assert_array_equal(a, b)

def learning_config(dtype: str):
    """The tiny model with full-precision filters (u-MBCliqueNet: the binary one needs about
    six epochs, test_train.py), 8 epochs of batch 32 under one cosine period."""
    config = tiny_digits_config(epochs=8, batch_size=32, compute_dtype=dtype)
    config.model.binarize = False
    config.schedule.first_period_epochs = 8.0
    return config


def float32_template(config):
    """The training state's structure with float32 parameters and optimizer state."""
    model = build_model(config, 10)
    tx, _ = optim.make_optimizer(config, steps_per_epoch=1437 // config.train.batch_size)
    abstract = jax.eval_shape(lambda: step.init_state(model, (tx,), (8, 8, 1), config.seed))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    as_float32 = lambda dtype: jnp.float32 if jnp.issubdtype(dtype, jnp.floating) else dtype
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, as_float32(leaf.dtype),
                                                          sharding=device), abstract)


@pytest.mark.slow
def test_bfloat16_learns_with_float32_state(tmp_path):
    """Chance is 0.10. Measured on CPU, final test accuracy float32 / bfloat16 after 8
    epochs: 0.908 / 0.914 (seed 0), 0.958 / 0.931 (seed 1), 0.892 / 0.939 (seed 2); after 4
    epochs the seed alone moved a run by 10-15 points. So bfloat16 must reach 0.8, which
    float32 reaches with every seed tried."""
    results = loop.train_and_evaluate(learning_config("bfloat16"), str(tmp_path / "bfloat16"))
    assert results["final_test_accuracy"] > 0.8, results
    # The saved state must match a float32 template (restore checks dtypes), and be float32.
    template = float32_template(learning_config("bfloat16"))
    with checkpoint.Checkpointer(tmp_path / "bfloat16" / "checkpoints") as saved:
        state, _ = saved.restore(template)
    for part in ("params", "opt_state"):
        floats = [leaf.dtype for leaf in jax.tree.leaves(state[part])
                  if jnp.issubdtype(leaf.dtype, jnp.floating)]
        assert floats and set(floats) == {jnp.dtype(jnp.float32)}, part


def test_compute_dtype_auto_resolves_per_backend_and_resumes():
    """`auto`: bfloat16 on a GPU or TPU, float32 on the CPU. config.json records what ran
    (`run_dir.resolve_auto`), and the same config file (auto) resumes it on this backend."""
    from cliquejax import kernels
    from cliquejax.train import run_dir

    assert [kernels.compute_dtype("auto", b) for b in ("cpu", "gpu", "cuda", "tpu")] == [
        "float32", "bfloat16", "bfloat16", "bfloat16"]
    assert kernels.compute_dtype("float32", "tpu") == "float32"
    config = cliquenet_config()
    assert config.train.compute_dtype == "auto"
    recorded = run_dir.resolve_auto(config)
    assert recorded.train.compute_dtype == kernels.compute_dtype("auto")
    assert config.train.compute_dtype == "auto"  # the caller's config is left as it was
    old, new = run_dir._config_dict(recorded), run_dir._config_dict(config)
    assert run_dir.config_differences(old, new)[0] == []
    other = "bfloat16" if recorded.train.compute_dtype == "float32" else "float32"
    old["train"]["compute_dtype"] = other  # a run that computed in the other precision
    assert run_dir.config_differences(old, new)[0] == [
        f"train.compute_dtype: {other!r} -> {recorded.train.compute_dtype!r}"]
