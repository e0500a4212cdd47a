"""What the models share: the base module holding the fields every model has (its BatchNorm,
and the four set by the run rather than `config.model`), and config checks giving one-line
errors naming field, value and what is allowed."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cliquejax import kernels, ops
from cliquejax.clique import REMAT_POLICIES

COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
BN_RUNNING_VARS = ("biased", "unbiased")
RUN_FIELDS = ("num_classes", "dtype", "remat", "ops")  # set by the run, not config.model


def check_choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not one of: {', '.join(map(str, allowed))}")


def check_range(field: str, value, low=None, high=None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low} <= {field}" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{field}={value!r} is out of range; allowed: {bounds}")


def check_lengths(fields: dict) -> None:
    """Per-block lists of equal length, of counts (widths, layers, channels) >= 1: a zero or
    negative width would only fail deep in the initializer (fan_in), naming no field."""
    for name, value in fields.items():
        for entry in value:  # the list as given (--config.model.widths=16,0,32)
            if entry < 1:
                raise ValueError(f"{name}={','.join(map(str, value))} holds {entry!r}; allowed: "
                                 "entries of 1 or more")
    lengths = {name: len(value) for name, value in fields.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise ValueError(f"per-block lists differ in length: {listed}; allowed: equal lengths")


class Model(nn.Module):
    """The base of every model. A model's other fields are its `config.model` fields, same
    names and defaults (`Model(**config.model, num_classes=..., dtype=..., remat=...,
    ops=...)`, `models.build_model`), each checked in its `__post_init__`. The BatchNorm
    defaults are the CIFAR CliqueNet's TensorFlow values (`ops.TF_BN`), which runs made before
    these fields existed used, so their config.json still builds the same network."""

    num_classes: int
    bn_momentum: float = ops.TF_BN.momentum
    bn_epsilon: float = ops.TF_BN.epsilon
    bn_running_var: str = "unbiased" if ops.TF_BN.unbiased_running_var else "biased"
    dtype: Any = None  # activations and convs (`config.train.compute_dtype`); params float32
    remat: str = "none"  # clique.REMAT_POLICIES (`config.train.remat`)
    ops: ops.Ops = ops.REFERENCE  # the operations (`config.train.kernels`, `cliquejax.kernels`)

    def __post_init__(self):
        check_range("model.bn_momentum", self.bn_momentum, 0.0, 1.0)
        if not self.bn_epsilon > 0:
            raise ValueError(f"model.bn_epsilon={self.bn_epsilon!r} is out of range; "
                             "allowed: > 0")
        check_choice("model.bn_running_var", self.bn_running_var, BN_RUNNING_VARS)
        super().__post_init__()

    @property
    def bn(self) -> ops.BNSpec:
        """The BatchNorm every layer of the model uses."""
        return ops.BNSpec(float(self.bn_momentum), float(self.bn_epsilon),
                          self.bn_running_var == "unbiased")


def compute_dtype(config):
    """The activation/conv dtype from `config.train.compute_dtype` (params stay float32);
    `auto` per backend (`kernels.compute_dtype`)."""
    name = config.train.get("compute_dtype", "float32") if "train" in config else "float32"
    check_choice("train.compute_dtype", name, ("auto", *COMPUTE_DTYPES))
    return COMPUTE_DTYPES[kernels.compute_dtype(name)]


def remat_policy(config) -> str:
    """What the backward pass recomputes, from `config.train.remat` (see `clique`):
    auto (per backend: `kernels.remat`) | none | layer (each clique layer and conv unit) |
    layer_keep_1x1 (layer, keeping the 1x1 conv outputs of bottleneck layers) | block (each
    whole block)."""
    name = config.train.get("remat", "none") if "train" in config else "none"
    check_choice("train.remat", name, ("auto", *REMAT_POLICIES))
    return kernels.remat(name)
