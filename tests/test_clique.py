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
    assert_loop_equals_unrolled(spec, train)


def assert_loop_equals_unrolled(spec, train):
    """The block's outputs, statistics and gradients are the same in both forms; returns the
    unrolled ones."""
    params, stats = random_block(spec)
    x0 = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, spec.in_channels))
    unrolled = run_block(spec, params, stats, x0, train)
    looped = run_block(dataclasses.replace(spec, unroll=False), params, stats, x0, train)
    assert jax.tree.structure(unrolled) == jax.tree.structure(looped)
    for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(looped), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    return unrolled


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


# --- a new variant, defined in one place ------------------------------------------------


def chain_and_evens(num_layers: int, x: int) -> clique.Wiring:
    """Stage I: each layer reads X0 and the layer before it (not every earlier layer). Stage
    II: the even layers, last first, each from X0 and every other layer. The head gets X0 and
    the features after Stage II, the next block the Stage-I features."""
    layers = range(1, num_layers + 1)
    return clique.Wiring(
        stage_one=tuple(tuple(sorted({0, i - 1})) for i in layers),
        stage_two=tuple((i, tuple(j for j in range(num_layers + 1) if j != i))
                        for i in reversed(layers) if i % 2 == 0),
        block=((1, 0), *((2, j) for j in layers)),
        transit=tuple((1, j) for j in layers))


@pytest.mark.parametrize("stage_one,stage_two", [
    (((0,), (0, 2)), ()),  # Stage I reads a layer not computed yet
    (((0,), (0, 1)), ((1, (2, 0)),)),  # inputs out of order: the loop form pads in order
    (((0,), (0, 1)), ((1, (1, 2)),)),  # a layer reads itself
    (((0,), (0, 1)), ((2, (1,)), (2, (0, 1))))])  # a layer updated twice in Stage II
def test_a_wiring_that_cannot_run_is_refused(stage_one, stage_two):
    with pytest.raises(ValueError, match="reads or passes on a feature it cannot"):
        clique.Wiring(stage_one, stage_two, block=((1, 0),), transit=((1, 1),))


@pytest.fixture
def chain(monkeypatch):
    monkeypatch.setitem(clique.VARIANTS, "chain", chain_and_evens)
    return "chain"


def test_a_new_variant_has_the_parameters_it_reads(chain):
    spec = clique.BlockSpec(in_channels=5, channels=3, num_layers=4, variant=chain)
    layout = clique.param_layout(spec)
    kernels = {name for name, (kind, _) in layout.items() if kind == "kernel"}
    expected = ({f"W_0to{i}" for i in range(1, 5)} | {"W_1to2", "W_2to3", "W_3to4"}
                | {f"W_{j}to{i}" for i in (2, 4) for j in range(5) if j != i})
    assert kernels == expected
    assert layout["W_0to4"] == ("kernel", (3, 3, 5, 3))
    assert [layout[f"BN_I_{i}"][1] for i in range(1, 5)] == [5, 8, 8, 8]
    assert layout["BN_II_2"] == layout["BN_II_4"] == ("bn", 5 + 3 * 3)
    assert "BN_II_1" not in layout and "BN_II_3" not in layout


@pytest.mark.parametrize("bottleneck", [False, True])
def test_a_new_variant_loop_equals_unrolled(chain, bottleneck):
    spec = clique.BlockSpec(in_channels=5, channels=3, num_layers=4, variant=chain,
                            bottleneck=bottleneck, dropout_rate=0.2)
    (block, transit, _), _ = assert_loop_equals_unrolled(spec, True)
    assert block.shape[-1] == 5 + 4 * 3 and transit.shape[-1] == 4 * 3


def test_a_new_variant_trains_in_the_model(chain):
    """The registered variant is a `model.variant` of CliqueNet: it builds, and a few SGD steps
    on one small batch lower the loss."""
    from cliquejax.models import build_model
    from configs import cliquenet_cifar10

    config = cliquenet_cifar10.get_config()
    config.model.update(dict(k=4, T=12, variant=chain, dropout_rate=0.0))
    model = build_model(config, 5)
    images = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16, 3))
    labels = jnp.arange(8) % 5
    variables = model.init(jax.random.PRNGKey(1), images)
    assert "W_1to3" not in variables["params"]["block1"]  # Stage I reads X0 and X2 only

    @jax.jit
    def step(params, batch_stats):
        def loss(p):
            logits, state = model.apply({"params": p, "batch_stats": batch_stats}, images,
                                        train=True, mutable=["batch_stats"])
            onehot = jax.nn.one_hot(labels, 5)
            return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), state
        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        return params, state["batch_stats"], value

    params, batch_stats = variables["params"], variables["batch_stats"]
    losses = []
    for _ in range(5):
        params, batch_stats, value = step(params, batch_stats)
        losses.append(float(value))
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
