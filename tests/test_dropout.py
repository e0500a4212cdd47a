"""Dropout (`Ops.dropout`, `Ops.fold_in`): the keep mask is a fair, independent coin per
element, fixed by the key, each folded stream independent, and the gradient is the mask
scaled by 1 / (1 - rate). Here on the reference operations (`jax.random`); the CPU kernels'
integer-hash dropout passes the same tests (tests/cpu/test_dropout.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cliquejax import ops

SHAPE = (16, 32, 32, 64)  # 1,048,576 elements: the dropped fraction has sigma ~ 4e-4


@pytest.fixture
def k():
    """The operations namespace under test."""
    return ops.REFERENCE


def mask_of(k, rng, rate=0.5, shape=SHAPE):
    return np.asarray(k.dropout(jnp.ones(shape), rate, rng, train=True) == 0)


def key(seed):
    return jax.random.PRNGKey(seed)


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.5, 0.9])
def test_dropped_fraction_is_the_rate(k, rate):
    n = np.prod(SHAPE)
    sigma = np.sqrt(rate * (1 - rate) / n)
    assert abs(mask_of(k, key(0), rate).mean() - rate) < 5 * sigma


def test_kept_units_are_scaled_and_the_mean_is_kept(k):
    x = jax.random.normal(key(3), SHAPE) + 1.0
    y = k.dropout(x, 0.2, key(0), train=True)
    kept = np.asarray(y != 0)
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.8, rtol=1e-6)
    assert abs(float(y.mean()) - float(x.mean())) < 5e-3


def test_same_key_same_mask_other_key_independent_mask(k):
    a, b = mask_of(k, key(0)), mask_of(k, key(1))
    np.testing.assert_array_equal(a, mask_of(k, key(0)))
    # independent fair coins agree half the time
    assert abs((a == b).mean() - 0.5) < 5 * np.sqrt(0.25 / a.size)


@pytest.mark.parametrize("axis", [0, 1, 2, 3])
def test_neighbours_are_independent(k, axis):
    """P(both dropped) = rate^2 for neighbours along every axis (batch, rows, columns,
    channels): consecutive indices show no correlation."""
    rate, mask = 0.2, mask_of(k, key(7), 0.2)
    first = np.take(mask, range(SHAPE[axis] - 1), axis=axis)
    second = np.take(mask, range(1, SHAPE[axis]), axis=axis)
    both = (first & second).mean()
    assert abs(both - rate**2) < 5 * np.sqrt(rate**2 * (1 - rate**2) / first.size)


def test_gradient_is_the_scaled_mask(k):
    x = jax.random.normal(key(1), (4, 8, 8, 16))
    grad = jax.grad(lambda x: jnp.sum(k.dropout(x, 0.3, key(2), train=True) * 2.0))(x)
    keep = k.dropout(jnp.ones_like(x), 0.3, key(2), train=True) != 0
    np.testing.assert_allclose(grad, np.where(keep, 2.0 / 0.7, 0.0), rtol=1e-6)


def test_inactive_outside_training_or_at_rate_zero(k):
    x = jnp.arange(24.0).reshape(2, 3, 4)
    assert k.dropout(x, 0.5, key(0), train=False) is x
    assert k.dropout(x, 0.0, key(0), train=True) is x


def test_folded_streams_are_independent_and_fixed(k):
    """`fold_in` (the per-layer dropout streams of a clique block, from the block's
    `fold_in(rng)`): the same stream twice gives the same mask, other streams of the same
    rng (and the same stream of another rng) give independent masks, and a traced stream
    number equals a static one (the loop form folds its traced layer index)."""
    block = k.fold_in(key(0))
    masks = [mask_of(k, k.fold_in(block, 1, stream)) for stream in range(4)]
    masks.append(mask_of(k, k.fold_in(k.fold_in(key(1)), 1, 0)))
    np.testing.assert_array_equal(masks[0], mask_of(k, k.fold_in(block, 1, 0)))
    sigma = np.sqrt(0.25 / masks[0].size)
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            assert abs((masks[a] == masks[b]).mean() - 0.5) < 5 * sigma, (a, b)
    drop = lambda rng: k.dropout(jnp.ones((64,)), 0.5, rng, train=True)
    traced = jax.jit(lambda rng, i: drop(k.fold_in(rng, 2, i)))(block, 3)
    np.testing.assert_array_equal(traced, drop(k.fold_in(block, 2, 3)))
