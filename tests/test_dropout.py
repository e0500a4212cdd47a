"""ops.dropout: the counter-hash keep mask is a fair, independent coin per element, fixed by
the key, and the gradient is the mask scaled by 1 / (1 - rate)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cliquejax import ops

SHAPE = (16, 32, 32, 64)  # 1,048,576 elements: the dropped fraction has sigma ~ 4e-4


def dropped(rate, seed, shape=SHAPE):
    y = ops.dropout(jnp.ones(shape), rate, jax.random.PRNGKey(seed), train=True)
    return np.asarray(y == 0)


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.5, 0.9])
def test_dropped_fraction_is_the_rate(rate):
    n = np.prod(SHAPE)
    sigma = np.sqrt(rate * (1 - rate) / n)
    assert abs(dropped(rate, 0).mean() - rate) < 5 * sigma


def test_kept_units_are_scaled_and_the_mean_is_kept():
    x = jax.random.normal(jax.random.PRNGKey(3), SHAPE) + 1.0
    y = ops.dropout(x, 0.2, jax.random.PRNGKey(0), train=True)
    kept = np.asarray(y != 0)
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.8, rtol=1e-6)
    assert abs(float(y.mean()) - float(x.mean())) < 5e-3


def test_same_key_same_mask_other_key_independent_mask():
    a, b = dropped(0.5, 0), dropped(0.5, 1)
    np.testing.assert_array_equal(a, dropped(0.5, 0))
    # independent fair coins agree half the time
    assert abs((a == b).mean() - 0.5) < 5 * np.sqrt(0.25 / a.size)


@pytest.mark.parametrize("axis", [0, 1, 2, 3])
def test_neighbours_are_independent(axis):
    """P(both dropped) = rate^2 for neighbours along every axis (batch, rows, columns,
    channels): the hash of consecutive indices shows no correlation."""
    rate, mask = 0.2, dropped(0.2, 7)
    first = np.take(mask, range(SHAPE[axis] - 1), axis=axis)
    second = np.take(mask, range(1, SHAPE[axis]), axis=axis)
    both = (first & second).mean()
    assert abs(both - rate**2) < 5 * np.sqrt(rate**2 * (1 - rate**2) / first.size)


def test_bits_are_uniform_in_every_byte():
    bits = np.asarray(ops.dropout_bits(jax.random.PRNGKey(5), (1 << 18,)))
    expected = bits.size / 256
    for shift in (0, 8, 16, 24):
        counts = np.bincount((bits >> shift) & 0xFF, minlength=256)
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 350, (shift, chi2)  # 255 degrees of freedom: P(chi2 > 350) < 1e-4


def test_gradient_is_the_scaled_mask():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 16))
    key = jax.random.PRNGKey(2)
    grad = jax.grad(lambda x: jnp.sum(ops.dropout(x, 0.3, key, train=True) * 2.0))(x)
    keep = ops.dropout(jnp.ones_like(x), 0.3, key, train=True) != 0
    np.testing.assert_allclose(grad, np.where(keep, 2.0 / 0.7, 0.0), rtol=1e-6)


def test_inactive_outside_training_or_at_rate_zero():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    key = jax.random.PRNGKey(0)
    assert ops.dropout(x, 0.5, key, train=False) is x
    assert ops.dropout(x, 0.0, key, train=True) is x


def mask_of(seed, shape=SHAPE, rate=0.5):
    return np.asarray(ops.dropout(jnp.ones(shape), rate, seed, train=True) == 0)


def test_folded_streams_are_independent_and_fixed():
    """`fold_seed` (the per-layer dropout streams of a clique block): the same stream twice
    gives the same mask, other streams of the same seed (and the same stream of another
    seed) give independent masks, and a traced stream number equals a static one (the loop
    form folds its traced layer index)."""
    seed = ops.dropout_seed(jax.random.PRNGKey(0))
    masks = [mask_of(ops.fold_seed(seed, stream)) for stream in range(4)]
    masks.append(mask_of(ops.fold_seed(ops.dropout_seed(jax.random.PRNGKey(1)), 0)))
    np.testing.assert_array_equal(masks[0], mask_of(ops.fold_seed(seed, 0)))
    sigma = np.sqrt(0.25 / masks[0].size)
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            assert abs((masks[a] == masks[b]).mean() - 0.5) < 5 * sigma, (a, b)
    traced = jax.jit(lambda s, i: ops.dropout_bits(ops.fold_seed(s, i), (64,)))(seed, 3)
    np.testing.assert_array_equal(traced, ops.dropout_bits(ops.fold_seed(seed, 3), (64,)))


def test_a_key_and_its_seed_give_the_same_mask():
    key = jax.random.PRNGKey(4)
    np.testing.assert_array_equal(mask_of(key), mask_of(ops.dropout_seed(key)))
