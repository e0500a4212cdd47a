"""Model registry: `config.model.name` -> builder(config, num_classes) -> flax Module."""

from __future__ import annotations

import importlib

from cliquejax.models.common import check_choice

MODEL_MODULES = {
    "cliquenet": "cliquejax.models.cliquenet",
    "cliquenet_imagenet": "cliquejax.models.cliquenet_imagenet",
    "densenet": "cliquejax.models.densenet",
    "mbcliquenet": "cliquejax.models.mbcliquenet",
}


def get_module(name: str):
    check_choice("model.name", name, sorted(MODEL_MODULES))
    return importlib.import_module(MODEL_MODULES[name])


def build_model(config, num_classes: int):
    """Validates `config.model` and returns the flax module for `num_classes` classes."""
    return get_module(config.model.name).build(config, num_classes)
