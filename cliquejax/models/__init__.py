"""Model registry: `config.model.name` -> its flax module, whose fields are the other
`config.model` fields (same names) plus `common.RUN_FIELDS`, checked when it is made."""

from __future__ import annotations

import dataclasses
import importlib

from cliquejax import kernels
from cliquejax.models.common import RUN_FIELDS, check_choice, compute_dtype, remat_policy

MODELS = {  # config.model.name: (file, module)
    "cliquenet": ("cliquejax.models.cliquenet", "CliqueNet"),
    "cliquenet_imagenet": ("cliquejax.models.cliquenet_imagenet", "CliqueNetImageNet"),
    "densenet": ("cliquejax.models.densenet", "DenseNet"),
    "mbcliquenet": ("cliquejax.models.mbcliquenet", "MBCliqueNet"),
}


def get_model(name: str):
    """The flax module class of model `name`."""
    check_choice("model.name", name, sorted(MODELS))
    file, cls = MODELS[name]
    return getattr(importlib.import_module(file), cls)


def model_kwargs(model_config) -> dict:
    """`config.model` (a ConfigDict or a run's config.json dict) as its module's keyword
    arguments: `name` dropped, lists made tuples (JSON has no tuples), and a key the model
    does not have refused rather than ignored."""
    given = dict(model_config.items())
    name = given.pop("name", None)
    allowed = sorted(field.name for field in dataclasses.fields(get_model(name))
                     if field.name not in (*RUN_FIELDS, "parent", "name"))
    for key in sorted(given):
        if key not in allowed:
            raise ValueError(f"model.{key} is not a field of model {name}; "
                             f"allowed: {', '.join(allowed)}")
    return {key: tuple(value) if isinstance(value, list) else value
            for key, value in given.items()}


def check(model_config):
    """Validates `config.model` without a run's config (what `reproduce` reads): the module
    is made (cheap: nothing is traced), which checks every field."""
    return get_model(model_config.name)(**model_kwargs(model_config), num_classes=1)


def build_model(config, num_classes: int):
    """The flax module of `config` for `num_classes` classes; a bad `config.model` is refused."""
    return get_model(config.model.name)(
        **model_kwargs(config.model), num_classes=num_classes, dtype=compute_dtype(config),
        remat=remat_policy(config), ops=kernels.for_config(config))
