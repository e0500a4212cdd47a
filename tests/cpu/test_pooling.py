"""The CPU kernels' max_pool (`cliquejax.cpu.ops`): its hand-written gradient equals JAX's
gradient of the reference `ops.max_pool` (XLA's select-and-scatter of the same reduce_window),
ties included (first maximum in row-major window order)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cliquejax import ops

cpu_ops = pytest.importorskip("cliquejax.cpu.ops")


def gradients(x, dy, size, stride):
    ours = jax.vjp(lambda x: cpu_ops.max_pool(x, size, stride), x)[1](dy)[0]
    xla = jax.vjp(lambda x: ops.max_pool(x, size, stride), x)[1](dy)[0]
    return np.asarray(ours), np.asarray(xla)


@pytest.mark.parametrize("shape,size,stride", [((2, 12, 12, 3), 3, 2), ((2, 9, 7, 4), 3, 2),
                                               ((1, 8, 8, 2), 2, 2), ((1, 6, 5, 2), 3, 1)])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_gradient_equals_xla(shape, size, stride, ties):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    if ties:  # few distinct values: most windows hold their maximum more than once
        x = jnp.round(x)
    y = cpu_ops.max_pool(x, size, stride)
    np.testing.assert_array_equal(y, ops.max_pool(x, size, stride))
    dy = jax.random.normal(jax.random.PRNGKey(1), y.shape)
    ours, xla = gradients(x, dy, size, stride)
    np.testing.assert_allclose(ours, xla, rtol=0, atol=1e-6)
    # every output's gradient lands on exactly one input
    ones, _ = gradients(x, jnp.ones_like(y), size, stride)
    assert ones.sum() == y.size and set(np.unique(ones)) <= set(range(size * size + 1))


def test_first_maximum_takes_the_gradient():
    x = jnp.zeros((1, 3, 3, 1))  # one 3x3/2 window over all-equal values (padding -inf)
    ours, _ = gradients(x, jnp.ones((1, 2, 2, 1)), 3, 2)
    # output (0, 0) sees rows/cols -1..1: first real element (0, 0); (0, 1): cols 1..3 ->
    # (0, 1); (1, 0): (1, 0); (1, 1): (1, 1)
    np.testing.assert_array_equal(ours[0, :, :, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])
