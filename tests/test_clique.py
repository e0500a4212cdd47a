"""The clique block's pure functions: loop form == unrolled form (outputs, statistics and
gradients), and Stage II follows docs/papers.md §1 (in place, in order, without X0)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cliquejax import clique, ops


def random_block(spec: clique.BlockSpec, seed=0):
    key = jax.random.PRNGKey(seed)
    params, stats = {}, {}
    for idx, (name, (kind, arg)) in enumerate(clique.param_layout(spec).items()):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, idx), 3)
        if kind == "kernel":
            params[name] = jax.random.normal(k1, arg) * (2.0 / np.prod(arg[:3])) ** 0.5
        else:
            params[name] = {"scale": 1 + 0.1 * jax.random.normal(k1, (arg,)),
                            "bias": 0.1 * jax.random.normal(k2, (arg,))}
            stats[name] = {"mean": 0.1 * jax.random.normal(k3, (arg,)),
                           "var": 1 + 0.1 * jax.random.uniform(k3, (arg,))}
    return params, stats


def run_block(spec, params, stats, x0, train):
    def loss(p, x):
        block, transit, new_stats = clique.clique_block(p, stats, x, jax.random.PRNGKey(7),
                                                        train, spec)
        return jnp.mean(block**2) + jnp.mean(jnp.sin(transit)), (block, transit, new_stats)

    (_, outputs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, x0)
    return outputs, grads


CASES = [("II+II", 0, False), ("I+I", 0, False), ("I+II", 0, False), ("X", 2, False),
         ("II+II", 0, True), ("X", 1, True)]


@pytest.mark.parametrize("train", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("variant,x,bottleneck", CASES)
def test_loop_equals_unrolled(variant, x, bottleneck, train):
    spec = clique.BlockSpec(in_channels=5, channels=4, num_layers=3, variant=variant, x=x,
                            bottleneck=bottleneck, dropout_rate=0.2, unroll=True)
    params, stats = random_block(spec)
    x0 = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 5))
    unrolled = run_block(spec, params, stats, x0, train)
    looped = run_block(dataclasses.replace(spec, unroll=False), params, stats, x0, train)
    assert jax.tree.structure(unrolled) == jax.tree.structure(looped)
    for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(looped), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dropout_is_active_in_training_only():
    spec = clique.BlockSpec(in_channels=3, channels=4, num_layers=2, dropout_rate=0.5)
    params, stats = random_block(spec)
    x0 = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, 3))
    run = lambda rng, train: clique.clique_block(params, stats, x0, rng, train, spec)[1]
    a, b = run(jax.random.PRNGKey(0), True), run(jax.random.PRNGKey(1), True)
    assert not np.allclose(a, b)
    assert float(jnp.mean(a == 0)) > 0.3  # about half the units of the last layer dropped
    np.testing.assert_array_equal(run(jax.random.PRNGKey(0), False),
                                  run(jax.random.PRNGKey(1), False))


def test_stage_two_by_hand():
    """n = 2: Stage I X1 = f(X0), X2 = f(X0, X1); Stage II X1' = f(X2), X2' = f(X1')."""
    spec = clique.BlockSpec(in_channels=3, channels=2, num_layers=2, dropout_rate=0.0)
    params, stats = random_block(spec, seed=3)
    x0 = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 4, 3))

    def layer(inputs, bn, kernels):
        y, _ = ops.bn_relu(jnp.concatenate(inputs, -1), params[bn], stats[bn], False)
        return ops.conv2d(y, jnp.concatenate([params[k] for k in kernels], axis=2))

    x1 = layer([x0], "BN_I_1", ["W_0to1"])
    x2 = layer([x0, x1], "BN_I_2", ["W_0to2", "W_1to2"])
    x1 = layer([x2], "BN_II_1", ["W_2to1"])
    x2 = layer([x1], "BN_II_2", ["W_1to2"])
    for unroll in (True, False):
        block, transit, _ = clique.clique_block(params, stats, x0, jax.random.PRNGKey(0), False,
                                                dataclasses.replace(spec, unroll=unroll))
        np.testing.assert_allclose(transit, jnp.concatenate([x1, x2], -1), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(block, jnp.concatenate([x0, x1, x2], -1), rtol=1e-5,
                                   atol=1e-5)


def test_param_layout_names_the_pieces():
    spec = clique.BlockSpec(in_channels=8, channels=4, num_layers=3, variant="X", x=2)
    layout = clique.param_layout(spec)
    assert layout["W_0to2"] == ("kernel", (3, 3, 8, 4))
    assert layout["W_3to1"] == ("kernel", (3, 3, 4, 4))
    assert layout["BN_I_3"] == ("bn", 8 + 2 * 4)
    assert layout["BN_II_2"] == ("bn", 2 * 4)
    assert "BN_II_3" not in layout  # only layers 1..x get a Stage-II BN
    kernels = [n for n, (kind, _) in layout.items() if kind == "kernel"]
    assert len(kernels) == 3 * 2 + 3  # W[j->i] for j != i, plus W[0->i]


@pytest.mark.parametrize("remat", ["none", "layer"])
def test_equal_shaped_layers_are_traced_once(monkeypatch, remat):
    """With remat, the n Stage-II layers of a block (equal shapes) share one traced layer
    function: the block traces n + 1 layers, not 2n (Stage I's n have n shapes)."""
    traced = []
    real_layer = clique._layer
    monkeypatch.setattr(clique, "_layer", lambda *a, **kw: traced.append(1) or real_layer(*a, **kw))
    # odd sizes, so that no earlier test has traced these shapes already
    spec = clique.BlockSpec(in_channels=5, channels=3, num_layers=4, dropout_rate=0.0,
                            remat=remat)
    params, stats = random_block(spec)
    run_block(spec, params, stats, jnp.ones((2, 5, 5, 5)), train=True)
    assert len(traced) == (spec.num_layers + 1 if remat == "layer" else 2 * spec.num_layers)
