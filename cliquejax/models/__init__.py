"""Model registry: `config.model.name` -> its module, which has `FIELDS` (the dataclass of
the model's `config.model` fields, checked when made) and `build(config, num_classes)` (the
flax Module)."""

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


def model_fields(model_config):
    """`config.model` as its model's dataclass of fields; a bad or unknown field is refused."""
    return get_module(model_config.name).FIELDS.from_config(model_config)


def build_model(config, num_classes: int):
    """Validates `config.model` and returns the flax module for `num_classes` classes."""
    return get_module(config.model.name).build(config, num_classes)
