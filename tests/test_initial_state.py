"""step.initial_state: compiled cheaply on CPU (LLVM level 0), the same initial state as the
fully optimised compile within one float32 ulp, placed with the requested sharding."""

import jax
import numpy as np
import optax

from cliquejax.models import build_model
from cliquejax.train import step
from tests.conftest import tiny_digits_config


def test_initial_state_equals_the_optimised_compile():
    model, transforms = build_model(tiny_digits_config(), 10), (optax.sgd(0.1, momentum=0.9),)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    cheap = step.initial_state(model, transforms, (8, 8, 1), 3, sharding)
    full = jax.jit(lambda: step.init_state(model, transforms, (8, 8, 1), 3))()
    assert jax.tree.structure(cheap) == jax.tree.structure(full)
    for a, b in zip(jax.tree.leaves(cheap), jax.tree.leaves(full), strict=True):
        assert a.dtype == b.dtype and a.sharding == sharding
        np.testing.assert_allclose(a, b, rtol=2e-7, atol=1e-7)
    spread = [float(np.std(leaf)) for leaf in jax.tree.leaves(cheap["params"]) if leaf.ndim == 4]
    assert min(spread) > 0  # the kernels are random, not zeros
