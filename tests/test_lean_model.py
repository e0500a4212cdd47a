"""The lean model side of the step (issue 34): a block's weight transforms batched
(`layers.transform_stacked`: same-shaped latent weights binarised and modulated together)
give the values, running statistics and gradients of one transform per weight; the
parameter tree does not change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cliquejax import clique, layers
from cliquejax.models import build_model
from tests.test_mbcliquenet import small_config


def one_by_one(latents, transform):
    """Today's weight transforms: one per weight."""
    return {name: transform(latent) for name, latent in latents.items()}


# A whole network, per leaf: |new - old| <= 1e-4 |old| (Euclidean norms): the two programs
# compute the same elementwise transforms, but XLA fuses and orders the gradients' sums
# differently in each (float32).
NETWORK_TOLERANCE = 1e-4


def assert_close_trees(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        error = np.linalg.norm(np.asarray(x) - np.asarray(y))
        assert error <= NETWORK_TOLERANCE * np.linalg.norm(np.asarray(y)) + 1e-7


VARIANTS = [(variant, 1 if variant == "X" else 0) for variant in clique.VARIANTS]


def run_model(config):
    """(init variables, (logits, new batch_stats) in training, their gradients w.r.t. the
    params, logits in inference)."""
    model = build_model(config, 10)
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


@pytest.mark.parametrize("variant,x", [
    VARIANTS[0], *(pytest.param(*v, marks=pytest.mark.slow) for v in VARIANTS[1:])])
def test_batched_transforms_equal_one_per_weight(monkeypatch, variant, x):
    """MBCliqueNet, every clique variant: the same parameter tree and init, the same
    logits, running statistics and gradients as one transform per weight."""
    config = small_config(variant=variant, x=x)
    new = run_model(config)
    monkeypatch.setattr(layers, "transform_stacked", one_by_one)
    old = run_model(config)
    jax.tree.map(np.testing.assert_array_equal, new[0], old[0])  # one init path, same RNG: exact
    assert_close_trees(new[1:], old[1:])


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
