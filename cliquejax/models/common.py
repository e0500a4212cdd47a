"""Config checks shared by the model builders: one-line errors naming field, value and what
is allowed."""

from __future__ import annotations

import jax.numpy as jnp

from cliquejax.clique import REMAT_POLICIES

COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def check_choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not one of: {', '.join(map(str, allowed))}")


def check_range(field: str, value, low=None, high=None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low} <= {field}" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{field}={value!r} is out of range; allowed: {bounds}")


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


def remat_policy(config) -> str:
    """What the backward pass recomputes, from `config.train.remat` (see `clique`):
    none | layer (each clique layer and conv unit) | layer_keep_1x1 (layer, keeping the 1x1
    conv outputs of bottleneck layers) | block (each whole block)."""
    name = config.train.get("remat", "none") if "train" in config else "none"
    check_choice("train.remat", name, REMAT_POLICIES)
    return name
