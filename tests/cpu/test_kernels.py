"""Every XLA:CPU kernel (`cliquejax.cpu.ops.OPS`) against its reference (values and
gradients), training steps of CliqueNet and MBCliqueNet equal on both, and the reference
program made of stock operations only where the CPU kernels' is not."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cliquejax import kernels, ops
from cliquejax.models import build_model
from cliquejax.train import optim, step
from configs.default import get_config
from tests.test_precision_remat import cliquenet_config, digits_batch, mbcliquenet_config

cpu_ops = pytest.importorskip("cliquejax.cpu.ops")


@pytest.mark.parametrize("choice,backend,resolved", [("auto", "cpu", "cpu"),
                                                     ("cpu", "cuda", "cpu")])
def test_resolve(choice, backend, resolved):
    config = get_config()
    config.train.kernels = choice
    assert kernels.resolve(config, backend) == resolved
    assert kernels.namespace(resolved) is cpu_ops.OPS


def test_grad_norm_of_the_cpu_kernels_is_the_norm():
    """The training step's gradient norm, with the CPU kernels and the reference operations
    alike (one reduction over all leaves), equals Optax's."""
    tree = {"a": jax.random.normal(jax.random.PRNGKey(0), (3, 4)), "b": {"c": jnp.arange(5.0)}}
    model = build_model(cliquenet_config(), 10)
    assert model.ops is cpu_ops.OPS and kernels.grad_norm(model) is cpu_ops.global_norm
    assert kernels.grad_norm(model.clone(ops=ops.REFERENCE)) is kernels.global_norm
    np.testing.assert_allclose(cpu_ops.global_norm(tree), optax.tree.norm(tree), rtol=1e-6)


def test_remat_auto_on_the_cpu():
    assert kernels.remat("auto", "cpu") == cpu_ops.REMAT == "layer"

# ----------------------------------------------------------------------------- kernel by kernel


def _random(shape, seed, dtype=jnp.float32, shift=0.0):
    return (jax.random.normal(jax.random.PRNGKey(seed), shape) + shift).astype(dtype)


def _bn_inputs(dtype):
    x = _random((4, 5, 5, 6), 0, dtype, shift=0.5)
    params = {"scale": _random((6,), 1), "bias": _random((6,), 2)}
    stats = {"mean": _random((6,), 3), "var": 1.0 + jnp.arange(6.0)}
    return x, params, stats


def conv_case(dtype, kernel_size=3, stride=1, cin=16):
    x, w = _random((2, 7, 7, cin), 0), _random((kernel_size, kernel_size, cin, 8), 1) * 0.1
    pad = "SAME" if stride == 1 else ((1, 1), (1, 1))
    return (lambda k, x, w: k.conv2d(x, w, stride, pad, dtype)), (x, w)


def bn_case(fn_name, train, dtype=jnp.float32, bn=ops.TORCH_BN):
    x, params, stats = _bn_inputs(dtype)
    def run(k, x, params):
        y, new = getattr(k, fn_name)(x, params, stats, train, bn)
        return y, new["mean"], new["var"]
    return run, (x, params)


# name -> (function of (kernels, *args) -> outputs, args, relative tolerance)
CASES = {
    "conv2d 3x3 float32": (*conv_case(None), 1e-5),
    "conv2d 1x1 float32": (*conv_case(None, 1), 1e-5),
    "conv2d 3x3/2 float32": (*conv_case(None, 3, 2), 1e-5),
    "conv2d 3x3 bfloat16": (*conv_case(jnp.bfloat16), 2e-2),
    "conv2d 1x1 bfloat16": (*conv_case(jnp.bfloat16, 1), 2e-2),
    "conv2d RGB bfloat16": (*conv_case(jnp.bfloat16, 3, 1, 3), 2e-2),
    "batch_norm train": (*bn_case("batch_norm", True), 1e-5),
    "batch_norm eval": (*bn_case("batch_norm", False), 1e-5),
    "bn_relu train": (*bn_case("bn_relu", True), 1e-5),
    "bn_relu eval": (*bn_case("bn_relu", False, bn=ops.TF_BN), 1e-5),
    "bn_relu train bfloat16": (*bn_case("bn_relu", True, jnp.bfloat16), 2e-2),
    "max_pool 3x3/2": (lambda k, x: k.max_pool(x, 3, 2), (_random((2, 9, 9, 3), 4),), 1e-5),
    "conv2d 1x1 named": (lambda k, x, w: k.conv2d(x, w, name=ops.CLIQUE_1X1),
                         conv_case(None, 1)[1], 1e-5),
}


def test_every_kernel_has_a_case():
    """Dropout draws its mask another way (equal in distribution: tests/cpu/test_dropout.py)."""
    fields = {f.name for f in dataclasses.fields(ops.Ops)} - {"name", "dropout", "fold_in"}
    assert fields == {name.split()[0] for name in CASES}


def _value_and_grads(fn, kernel_set, args):
    """fn's outputs and the gradient of a nonlinear function of them, all float32."""
    def loss(*args):
        outputs = jax.tree.leaves(fn(kernel_set, *args))
        return sum(jnp.sum(jnp.sin(o.astype(jnp.float32) * (i + 1)))
                   for i, o in enumerate(outputs)), outputs
    (_, outputs), grads = jax.jit(jax.value_and_grad(loss, range(len(args)), has_aux=True))(
        *args)
    return [a.astype(jnp.float32) for a in jax.tree.leaves((outputs, grads))]


@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_kernel_equals_reference(case):
    """Values and gradients: float32 within 1e-5, bfloat16 (products rounded to bfloat16
    in another order) within 2e-2, relative to each array's largest magnitude."""
    fn, args, tolerance = CASES[case]
    got = _value_and_grads(fn, cpu_ops.OPS, args)
    want = _value_and_grads(fn, ops.REFERENCE, args)
    assert len(got) == len(want) >= 2
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=tolerance,
                                   atol=tolerance * max(1.0, float(jnp.max(jnp.abs(w)))))

# ----------------------------------------------------------------------------- whole steps


# MBCliqueNet is compared after one step: a binary network's sign and the M-filter shared by
# a whole block amplify float32 rounding differences (the order of a sum) from the second
# step on (measured: up to 5e-5 relative in a momentum after two steps, 1e-3 after three),
# as between 1 and 8 devices (tests/test_distributed.py).
STEPS = {"cliquenet": 3, "mbcliquenet": 1}


def _config(name: str, choice: str):
    config = {"cliquenet": cliquenet_config, "mbcliquenet": mbcliquenet_config}[name]()
    # remat changes no value on either (tests/test_precision_remat.py); without it the
    # steps compile faster. The two draw dropout masks differently (tests/cpu/test_dropout.py).
    config.train.kernels, config.train.remat = choice, "none"
    config.model.dropout_rate = 0.0
    return config


@functools.cache
def _initial_state(name: str):
    """The same for both kernels (initialisation runs no kernel), computed once."""
    config = _config(name, "reference")
    model, (tx, _) = build_model(config, 10), optim.make_optimizer(config, 10)
    return step.initial_state(model, (tx,), (8, 8, 1), 0,
                              jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def train_steps(name: str, choice: str):
    config = _config(name, choice)
    model = build_model(config, 10)
    assert model.ops.name == choice
    tx, schedule = optim.make_optimizer(config, steps_per_epoch=10)
    train = jax.jit(functools.partial(step.train_step, model=model, transforms=(tx,),
                                      schedule=schedule, seed=0))
    state, losses = _initial_state(name), []
    for index in range(STEPS[name]):
        batch = digits_batch(32) if index % 2 == 0 else jax.tree.map(
            lambda a: a[::-1], digits_batch(32))
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state)


@pytest.mark.slow  # whole-model steps; the unit tests of each kernel are in the fast tier
@pytest.mark.parametrize("name", ["cliquenet", "mbcliquenet"])
def test_training_steps_equal_on_both_kernels(name):
    """SGD steps (momentum, weight decay; MBCliqueNet binary) in float32: the same losses,
    parameters, BN statistics and momentum."""
    losses, state = train_steps(name, "cpu")
    ref_losses, ref_state = train_steps(name, "reference")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state),
                            jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.max(np.abs(b))),
                                   err_msg=jax.tree_util.keystr(path))
    assert len(losses) == STEPS[name]

# ----------------------------------------------------------------------------- the programs


def _primitives(jaxpr) -> list[str]:
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    names.extend(_primitives(inner))
    return names


def step_primitives(config) -> list[str]:
    """Every primitive of the bfloat16 training step's jaxpr (forward and backward)."""
    config.train.compute_dtype = "bfloat16"
    model = build_model(config, 10)
    tx, schedule = optim.make_optimizer(config, steps_per_epoch=10)
    state = jax.eval_shape(lambda: step.init_state(model, (tx,), (8, 8, 1), seed=0))
    train = functools.partial(step.train_step, model=model, transforms=(tx,),
                              schedule=schedule, seed=0)
    return _primitives(jax.make_jaxpr(train)(state, digits_batch(32)).jaxpr)


@pytest.mark.parametrize("name", ["cliquenet", "u-mbcliquenet"])
def test_reference_program_is_stock_operations(name):
    """kernels=reference, bfloat16: the convolutions stay convolutions (the only products are
    the classifier's, forward and backward), with no conditional, bitcast or custom
    derivative; the CPU kernels' program of the same step has all of them."""
    def config(choice):
        c = cliquenet_config() if name == "cliquenet" else mbcliquenet_config()
        if name == "u-mbcliquenet":
            c.model.binarize = False  # the sign's straight-through estimator is custom
        c.train.kernels = choice
        c.model.dropout_rate = 0.0  # jax.random's bits become floats by a bitcast of its own
        return c
    reference = step_primitives(config("reference"))
    assert reference.count("conv_general_dilated") > 10
    assert reference.count("dot_general") <= 3
    # (`jax.nn.relu` itself is a custom_jvp of JAX's: its derivative at 0)
    assert not {"cond", "bitcast_convert_type", "custom_vjp_call"} & set(reference)
    cpu = step_primitives(config("cpu"))
    assert cpu.count("dot_general") > 10 and {"cond", "bitcast_convert_type"} <= set(cpu)


