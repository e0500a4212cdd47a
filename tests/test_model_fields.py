"""config.model is each model's flax module's fields: every config file sets exactly its model's
fields, an unknown field or a bad value is a one-line error when the module is made, and a
run's config.json (lists, no BatchNorm fields in older runs) builds as before."""

import dataclasses
import importlib
import pathlib

import ml_collections
import pytest

from cliquejax import models, ops
from cliquejax.models.cliquenet import CliqueNet
from cliquejax.models.common import RUN_FIELDS
from cliquejax.models.mbcliquenet import MBCliqueNet
from configs import cliquenet_cifar10, cliquenet_imagenet, mbclique_cifar10

CONFIG_FILES = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
                      if p.stem != "__init__")
FLAX_FIELDS = ("parent", "name")  # every flax module's own


def one_line_error(make, message: str) -> str:
    with pytest.raises(ValueError) as error:
        make()
    text = str(error.value)
    assert message in text and "\n" not in text, text
    return text


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_sets_the_fields_of_its_module(name):
    """The module's fields are the config's keys (but `name`) and the four the run sets, and
    the built module holds the config's values under the same names. (`default` is the base
    every setting file starts from: it sets only the name, the rest are the defaults.)"""
    config = importlib.import_module(f"configs.{name}").get_config()
    cls = models.get_model(config.model.name)
    fields = {field.name for field in dataclasses.fields(cls)} - set(FLAX_FIELDS)
    if name != "default":
        assert fields == set(config.model) - {"name"} | set(RUN_FIELDS)
    model = models.build_model(config, 10)
    assert type(model) is cls and model.num_classes == 10
    given = {key: tuple(value) if isinstance(value, list) else value
             for key, value in config.model.items() if key != "name"}
    assert {key: getattr(model, key) for key in given} == given


def test_an_unknown_field_is_refused_with_the_fields_allowed():
    config = cliquenet_imagenet.get_config("S0")
    config.model.dropout_rate = 0.2  # the ImageNet model has no dropout
    for make in (lambda: models.build_model(config, 10), lambda: models.check(config.model)):
        text = one_line_error(make, "model.dropout_rate is not a field of model "
                                    "cliquenet_imagenet; allowed: attention, bn_epsilon, "
                                    "bn_momentum, bn_running_var, channels, layers, setting, "
                                    "unroll")
        assert text.endswith("unroll")


@pytest.mark.parametrize("cls,fields,message", [
    (MBCliqueNet, dict(widths=(64, 96, 128), K=5),
     "model.K=5 does not divide model.widths entry 64"),
    (MBCliqueNet, dict(layers=(4, 1, 4)),
     "model.layers entry 1 gives 1 layer per block, which has no Stage-II inputs in variant "
     "II+II; allowed: more layers per block, or variant I+I"),
    (MBCliqueNet, dict(variant="X", x=5), "model.x=5 is out of range"),
    (MBCliqueNet, dict(widths=(16, 0, 32)),  # as given, not "model.widths entry=0"
     "model.widths=16,0,32 holds 0; allowed: entries of 1 or more"),
    (MBCliqueNet, dict(transition_kernel=2), "model.transition_kernel=2 is not one of: 1, 3"),
    (MBCliqueNet, dict(stage_two_kernels="own_3x3"),
     "model.stage_two_kernels='own_3x3' is not one of: shared, own_clique, own"),
    (MBCliqueNet, dict(head_input="x0"),
     "model.head_input='x0' is not one of: x0_and_stage2, stage2"),
    (CliqueNet, dict(T=2), "model.T=2 gives 0 layers per block"),
    (CliqueNet, dict(T=6, bottleneck=True), "model.T=6 gives 1 layer"),
    (CliqueNet, dict(bn_running_var="sample"),
     "model.bn_running_var='sample' is not one of: biased, unbiased"),
    (CliqueNet, dict(bn_epsilon=0.0), "model.bn_epsilon=0.0 is out of range"),
    (CliqueNet, dict(bn_momentum=1.5), "model.bn_momentum=1.5 is out of range")])
def test_a_bad_value_is_refused_when_the_module_is_made(cls, fields, message):
    one_line_error(lambda: cls(num_classes=10, **fields), message)


def test_check_validates_a_stored_model_config_without_a_run_config():
    """What `reproduce` reads from a run's config.json: only its `model` object."""
    stored = ml_collections.ConfigDict(mbclique_cifar10.get_config().model.to_dict())
    assert models.check(stored).widths == (64, 128, 256)
    stored.K = 5
    one_line_error(lambda: models.check(stored), "model.K=5 does not divide")


def test_a_run_config_json_builds_the_same_model():
    """config.json holds lists where the config file has tuples: they become tuples again (the
    flax module keeps them hashable) and build the same network."""
    config = mbclique_cifar10.get_config()
    stored = ml_collections.ConfigDict(config.to_dict())
    stored.model.widths, stored.model.layers = [64, 128, 256], [4, 4, 4]
    model = models.build_model(stored, 10)
    assert model.widths == (64, 128, 256) and model.layers == (4, 4, 4)
    assert model == models.build_model(config, 10)


@pytest.mark.parametrize("get_config", [cliquenet_cifar10.get_config,
                                        mbclique_cifar10.get_config,
                                        lambda: cliquenet_imagenet.get_config("S0")])
def test_a_config_without_bn_fields_builds_with_the_tensorflow_batch_norm(get_config):
    """Runs made before the BatchNorm fields existed have none in config.json; they were
    trained with the TensorFlow BatchNorm, so that is what they build."""
    config = get_config()
    with config.unlocked():
        for field in ("bn_momentum", "bn_epsilon", "bn_running_var"):
            del config.model[field]
    assert models.check(config.model).bn == ops.TF_BN
    assert models.build_model(config, 10).bn == ops.TF_BN
