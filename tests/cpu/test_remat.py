"""Rematerialisation with the CPU kernels: the backward pass recomputes no BN batch moment
and, with remat=layer_keep_1x1, no clique convolution; `cpu_ops.saved_name` keeps a value as
its bits with the identity's derivative."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cliquejax import ops
from cliquejax.models import build_model
from cliquejax.train import step
from configs import cliquenet_imagenet
from tests.test_precision_remat import (
    TRANSFORMS,
    cliquenet_config,
    digits_batch,
    initial_state,
    jitted_train_step,
)

cpu_ops = pytest.importorskip("cliquejax.cpu.ops")


@pytest.mark.parametrize("remat", ["layer", "block"])
def test_remat_recomputes_no_batch_moments(remat):
    """The backward pass recomputes elementwise work, not the BN batch moments
    (`ops.REMAT_SAVED`): the compiled (XLA:CPU, CPU kernels) training step holds as many
    reductions as without remat (before the moments were saved: 179 against 145 with
    remat=layer)."""
    def reductions(policy):
        config = cliquenet_config()
        config.train.remat, config.model.dropout_rate = policy, 0.0
        config.train.kernels = "cpu"
        train = jitted_train_step(build_model(config, 10))
        hlo = train.lower(initial_state("cliquenet"), digits_batch()).compile().as_text()
        return hlo.count(" reduce(")
    assert reductions(remat) == reductions("none") > 0


@pytest.mark.slow
def test_remat_keep_1x1_recomputes_no_clique_convolution():
    """CliqueNet-S0's clique layers are bottleneck layers: with remat=layer the backward pass
    redoes each layer's 1x1 conv (a dot once XLA:CPU has compiled it; CPU kernels), with
    layer_keep_1x1 none of them; the units outside the blocks (transitions, attention) are
    rematerialised alike."""
    def products(remat):
        config = cliquenet_imagenet.get_config("S0")
        config.model.channels, config.model.layers = (8, 8, 8, 8), (2, 2, 2, 2)
        config.train.remat, config.train.kernels = remat, "cpu"
        model = build_model(config, 10)
        state = jax.jit(lambda: step.init_state(model, TRANSFORMS, (64, 64, 3), seed=0))()
        batch = {"image": jnp.ones((2, 64, 64, 3)), "label": jnp.zeros((2,), jnp.int32)}
        hlo = jitted_train_step(model).lower(state, batch).compile().as_text()
        # saved as bits (`cpu_ops.saved_name`): no kept value is copied through reduce-precision
        # (before: 408 of them, one a full copy of each kept 1x1 output)
        assert "reduce-precision" not in hlo
        return hlo.count(" dot(") + hlo.count(" convolution(")
    layer_updates = 4 * 2 * 2  # blocks x layers x stages
    assert products("layer_keep_1x1") == products("layer") - layer_updates


def test_saved_name_is_the_identity_with_its_derivative(capsys):
    """`cpu_ops.saved_name` keeps a float32 value as its bits: value and gradient are the
    identity's (a bare bitcast would have cut the gradient), also under remat, and the
    value is what the policy saves."""
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    f = lambda x: jnp.sum(jnp.sin(cpu_ops.saved_name(x * x, ops.BN_MOMENTS)))
    remat_f = jax.checkpoint(f, policy=ops.REMAT_SAVED)
    np.testing.assert_array_equal(cpu_ops.saved_name(x, ops.BN_MOMENTS), x)
    for fn in (f, remat_f):
        np.testing.assert_allclose(jax.grad(fn)(x), 2 * x * jnp.cos(x * x), rtol=1e-6)
    jax.ad_checkpoint.print_saved_residuals(remat_f, x)
    assert f"u32[5,3] named '{ops.BN_MOMENTS}'" in capsys.readouterr().out
