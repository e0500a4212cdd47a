"""The CPU kernels' BN-ReLU (`cliquejax.cpu.ops.bn_relu`, the written-out gradient of
`normalize_relu`) equals JAX's derivative of the reference `ops.bn_relu` (`ops.batch_norm`,
then ReLU), through the batch statistics in training and the running ones in evaluation, in
float32 and bfloat16, and its backward pass reduces two products per channel instead of
three."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cliquejax import clique, ops
from cliquejax.models import build_model
from tests.test_batch_norm import inputs
from tests.test_precision_remat import (
    cliquenet_config,
    digits_batch,
    initial_state,
    jitted_train_step,
)

cpu_ops = pytest.importorskip("cliquejax.cpu.ops")


def loss_and_grads(fn, dtype, train, bn=ops.TF_BN):
    x, params, stats, weights = inputs(dtype)

    def loss(x, params):
        y, new_stats = fn(x, params, stats, train, bn)
        return jnp.sum(y.astype(jnp.float32) * weights), new_stats

    (value, new_stats), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params)
    return value, new_stats, grads


@pytest.mark.parametrize("bn", [ops.TF_BN, ops.TORCH_BN])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 2e-5), (jnp.bfloat16, 1e-2)])
def test_written_gradient_equals_autodiff(dtype, tolerance, train, bn):
    value, stats, (dx, dparams) = loss_and_grads(cpu_ops.bn_relu, dtype, train, bn)
    ref_value, ref_stats, (ref_dx, ref_dparams) = loss_and_grads(ops.bn_relu, dtype, train, bn)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats), strict=True):
        np.testing.assert_array_equal(a, b)
    assert dx.dtype == dtype
    scale = float(jnp.max(jnp.abs(ref_dx.astype(jnp.float32))))
    np.testing.assert_allclose(dx.astype(jnp.float32), ref_dx.astype(jnp.float32),
                               atol=tolerance * scale)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(dparams[name], ref_dparams[name],
                                   atol=tolerance * float(jnp.max(jnp.abs(ref_dparams[name]))))
    assert float(jnp.max(jnp.abs(ref_dx.astype(jnp.float32)))) > 0


@pytest.fixture
def fresh_traces():
    """Drops cached traces before and after: a checkpointed layer's trace is cached by its
    function, which outlives the kernels it was traced with."""
    def clear():
        jax.clear_caches()
        clique._remat_if.cache_clear()
    clear()
    yield clear
    clear()


@pytest.mark.slow
def test_backward_takes_one_reduction_less_per_bn_relu(fresh_traces):
    """In a real (tiny CliqueNet) training step on the CPU kernels, each BN-ReLU's backward
    pass reduces two products per channel where JAX's derivative of the plain expression
    (the reference `ops.bn_relu` in the same kernels) reduced three (or more: XLA did not
    always merge those of the stem and transitions)."""
    calls = []

    def compiled_reductions(bn_relu):
        def counted(*args, **kwargs):
            calls.append(1)
            return bn_relu(*args, **kwargs)
        fresh_traces()
        calls.clear()
        config = cliquenet_config()
        config.train.kernels = "cpu"
        model = build_model(config, 10)
        model = model.clone(ops=dataclasses.replace(model.ops, bn_relu=counted))
        train = jitted_train_step(model)
        hlo = train.lower(initial_state("cliquenet"), digits_batch()).compile().as_text()
        return hlo.count(" reduce(")

    written = compiled_reductions(cpu_ops.bn_relu)
    assert len(calls) > 10
    assert compiled_reductions(ops.bn_relu) >= written + len(calls)
