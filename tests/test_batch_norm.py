"""BatchNorm: the reference `ops.batch_norm` equals the hand-computed normalisation and
running statistics of each model's framework (the CPU kernels' BN-ReLU:
tests/cpu/test_batch_norm.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cliquejax import ops

SHAPE = (4, 5, 5, 6)


def inputs(dtype):
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    x = (1.5 * jax.random.normal(keys[0], SHAPE) + 0.7).astype(dtype)
    params = {"scale": jax.random.normal(keys[1], (6,)), "bias": jax.random.normal(keys[2], (6,))}
    stats = {"mean": jax.random.normal(keys[3], (6,)), "var": 1.0 + jnp.arange(6.0)}
    weights = jax.random.normal(keys[4], SHAPE)
    return x, params, stats, weights


@pytest.mark.parametrize("bn", [ops.TF_BN, ops.TORCH_BN])
def test_batch_norm_equals_hand_computed(bn):
    """Training normalises with the biased batch variance and updates the running statistics
    with `momentum`, the variance corrected by n / (n - 1) where the framework does (PyTorch);
    evaluation normalises with the running statistics; epsilon inside the square root."""
    x, params, stats, _ = inputs(jnp.float32)
    xs, scale, bias = np.asarray(x, np.float64), np.asarray(params["scale"]), params["bias"]
    n = xs.size // xs.shape[-1]
    mean, var = xs.mean(axis=(0, 1, 2)), xs.var(axis=(0, 1, 2))
    y, new = ops.batch_norm(x, params, stats, True, bn)
    np.testing.assert_allclose(y, (xs - mean) / np.sqrt(var + bn.epsilon) * scale + bias,
                               rtol=1e-5, atol=1e-5)
    running_var = var * n / (n - 1) if bn.unbiased_running_var else var
    m = bn.momentum
    np.testing.assert_allclose(new["mean"], m * np.asarray(stats["mean"]) + (1 - m) * mean,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], m * np.asarray(stats["var"]) + (1 - m) * running_var,
                               rtol=1e-5, atol=1e-6)
    y_eval, same = ops.batch_norm(x, params, stats, False, bn)
    ref = (xs - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + bn.epsilon)
    np.testing.assert_allclose(y_eval, ref * scale + bias, rtol=1e-5, atol=1e-5)
    assert same is stats


@pytest.mark.parametrize("config_name,expected", [
    ("cliquenet_cifar10", ops.TF_BN), ("cliquenet_svhn", ops.TF_BN),
    ("densenet_cifar10", ops.TF_BN), ("cliquenet_imagenet", ops.TORCH_BN),
    ("mbclique_cifar10", ops.TORCH_BN), ("mbclique_mnist", ops.TORCH_BN),
    ("mbclique_digits", ops.TORCH_BN), ("mbclique_tinyimagenet", ops.TORCH_BN)])
def test_each_model_has_its_frameworks_batch_norm(config_name, expected):
    """The TF-derived CIFAR CliqueNet keeps epsilon 1e-3 and the biased running variance; the
    PyTorch-derived models (ImageNet CliqueNet, MBCliqueNet) have nn.BatchNorm2d's defaults."""
    import importlib

    from cliquejax import models

    config = importlib.import_module(f"configs.{config_name}").get_config()
    assert models.build_model(config, 10).bn == expected
