"""The lean model side of the step (issue 34): each feature's batch statistics computed once
and shared by the clique layers that read it (`Ops.share_statistics`), and a block's weight
transforms batched, give the values, running statistics and gradients of today's
formulation (each layer's BN over its concatenated input, each weight transformed on its
own); the parameter tree does not change."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cliquejax import clique, layers, ops
from cliquejax.models import build_model
from configs import cliquenet_cifar10
from tests.test_clique import random_block, run_block
from tests.test_mbcliquenet import small_config

# float32 throughout; the new form sums the same per-channel terms in another order
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def one_by_one(latents, transform):
    """Today's weight transforms: one per weight."""
    return {name: transform(latent) for name, latent in latents.items()}


# A whole network, per leaf: |new - old| <= 1e-4 |old| (Euclidean norms). Element by element
# MBCliqueNet's gradients differed by up to 1e-4 relative (float32, in a few elements near
# zero): the variance is E[x^2] - mean^2 over 64 values per channel in block 3 of the small
# model, where cancellation amplifies the order of the sums; the worst leaf was 2.5e-5.
NETWORK_TOLERANCE = 1e-4


def assert_close_trees(a, b, normwise: bool = False):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if normwise:
            error = np.linalg.norm(np.asarray(x) - np.asarray(y))
            assert error <= NETWORK_TOLERANCE * np.linalg.norm(np.asarray(y)) + 1e-7
        else:
            np.testing.assert_allclose(x, y, **TOLERANCE)


VARIANTS = [(variant, 1 if variant == "X" else 0) for variant in clique.VARIANTS]


@pytest.mark.parametrize("bottleneck", [False, True])
@pytest.mark.parametrize("variant,x", VARIANTS)
def test_shared_statistics_equal_the_concatenations(variant, x, bottleneck):
    """One block, every variant: outputs, new running statistics and gradients (of the
    parameters and the input), in training and in inference."""
    today = clique.BlockSpec(in_channels=5, channels=4, num_layers=3, variant=variant, x=x,
                             bottleneck=bottleneck, dropout_rate=0.2)
    shared = dataclasses.replace(today, ops=dataclasses.replace(ops.REFERENCE,
                                                                share_statistics=True))
    params, stats = random_block(today)
    x0 = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 5))
    run = lambda spec: [run_block(spec, params, stats, x0, train) for train in (True, False)]
    assert_close_trees(run(shared), run(today))


def model_config(name, variant, x):
    if name == "cliquenet":
        config = cliquenet_cifar10.get_config()
        config.model.update(dict(k=4, T=6, dropout_rate=0.0, variant=variant, x=x))
        return config
    return small_config(variant=variant, x=x)


def run_model(config, share_statistics):
    """(init variables, (logits, new batch_stats) in training, their gradients w.r.t. the
    params, logits in inference)."""
    model = build_model(config, 10)
    model = model.clone(ops=dataclasses.replace(model.ops, share_statistics=share_statistics))
    images = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
    variables = model.init(jax.random.PRNGKey(1), images)
    # away from the init's unit scale and zero running stats, so every piece matters
    variables = jax.tree.map(
        lambda v: v + 0.1 * jax.random.normal(jax.random.PRNGKey(v.size), v.shape), variables)

    def loss(params):
        logits, new = model.apply(dict(variables, params=params), images, train=True,
                                  mutable=["batch_stats"])
        return jnp.sum(jnp.sin(logits)), (logits, new)

    grads, out = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    inference = jax.jit(lambda v: model.apply(v, images, train=False))(variables)
    return variables, out, grads, inference


@pytest.mark.parametrize("name", ["cliquenet", "mbcliquenet"])
@pytest.mark.parametrize("variant,x", [
    VARIANTS[0], *(pytest.param(*v, marks=pytest.mark.slow) for v in VARIANTS[1:])])
def test_models_equal_todays_formulation(monkeypatch, name, variant, x):
    """CliqueNet and MBCliqueNet (their batched 1-bit weight transforms too): the same
    parameter tree and init, the same logits, running statistics and gradients."""
    config = model_config(name, variant, x)
    new = run_model(config, share_statistics=True)
    monkeypatch.setattr(layers, "transform_stacked", one_by_one)
    old = run_model(config, share_statistics=False)
    jax.tree.map(np.testing.assert_array_equal, new[0], old[0])  # tree, shapes, values
    assert_close_trees(new[1:], old[1:], normwise=True)


def test_transform_stacked_is_one_transform_per_weight():
    """Same-shaped latents are transformed together, others alone; every result is the
    weight's own transform (elementwise here, so exactly) under its own name, in order."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    latents = {"W_a": jax.random.normal(keys[0], (1, 1, 3, 2)),
               "W_b": jax.random.normal(keys[1], (3, 3, 2, 2)),
               "W_c": jax.random.normal(keys[2], (1, 1, 3, 2)),
               "W_d": jax.random.normal(keys[3], (1, 1, 3, 2))}
    transform = lambda w: jnp.where(w >= 0, 1.0, -1.0) * 0.5 + w * w
    out = layers.transform_stacked(latents, transform)
    assert list(out) == list(latents)
    for name, latent in latents.items():
        np.testing.assert_array_equal(out[name], transform(latent))
