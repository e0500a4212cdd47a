"""Config checks shared by the model builders: one-line errors naming field, value and what
is allowed."""

from __future__ import annotations

import jax.numpy as jnp

from cliquejax import kernels, ops
from cliquejax.clique import REMAT_POLICIES

COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def check_choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not one of: {', '.join(map(str, allowed))}")


def check_range(field: str, value, low=None, high=None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low} <= {field}" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{field}={value!r} is out of range; allowed: {bounds}")


BN_RUNNING_VARS = ("biased", "unbiased")


def bn_spec(model_config) -> ops.BNSpec:
    """The model's BatchNorm from `model.bn_momentum`, `model.bn_epsilon` and
    `model.bn_running_var` (biased | unbiased); a field left out takes the CIFAR CliqueNet's
    TensorFlow value (`ops.TF_BN`), which is also what runs made before these fields used."""
    m = model_config
    momentum = m.get("bn_momentum", ops.TF_BN.momentum)
    epsilon = m.get("bn_epsilon", ops.TF_BN.epsilon)
    running_var = m.get("bn_running_var", "unbiased" if ops.TF_BN.unbiased_running_var
                        else "biased")
    check_range("model.bn_momentum", momentum, 0.0, 1.0)
    if not epsilon > 0:
        raise ValueError(f"model.bn_epsilon={epsilon!r} is out of range; allowed: > 0")
    check_choice("model.bn_running_var", running_var, BN_RUNNING_VARS)
    return ops.BNSpec(float(momentum), float(epsilon), running_var == "unbiased")


def check_lengths(fields: dict) -> None:
    lengths = {name: len(value) for name, value in fields.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise ValueError(f"per-block lists differ in length: {listed}; allowed: equal lengths")


def compute_dtype(config):
    """The activation/conv dtype from `config.train.compute_dtype` (params stay float32)."""
    name = config.train.get("compute_dtype", "float32") if "train" in config else "float32"
    check_choice("train.compute_dtype", name, COMPUTE_DTYPES)
    return COMPUTE_DTYPES[name]


def kernel_ops(config) -> ops.Kernels:
    """The operations the model runs, from `config.train.kernels` (`cliquejax.kernels`)."""
    return kernels.for_config(config)


def remat_policy(config) -> str:
    """What the backward pass recomputes, from `config.train.remat` (see `clique`):
    none | layer (each clique layer and conv unit) | layer_keep_1x1 (layer, keeping the 1x1
    conv outputs of bottleneck layers) | block (each whole block)."""
    name = config.train.get("remat", "none") if "train" in config else "none"
    check_choice("train.remat", name, REMAT_POLICIES)
    return name
