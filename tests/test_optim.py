"""Schedules, weight-decay masks and the optimizer against hand-computed values; any Optax
optimizer by name, with one-line errors for an unknown name or argument."""

import json
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cliquejax import bits, names
from cliquejax.models import build_model
from cliquejax.train.optim import (
    make_optimizer,
    make_schedule,
    optimizer_kwargs,
    weight_decay_mask,
)
from configs import cliquenet_cifar10, mbclique_cifar10
from configs.default import get_config
from tests.conftest import launch_config


def l2_penalty(params, mask):
    """0.5 * sum of squares of the leaves where `mask` is True (the loss term that L2 decay
    stands for)."""
    squares = jax.tree.map(
        lambda leaf, decayed: jnp.sum(jnp.square(leaf)) if decayed else jnp.zeros(()),
        params, mask)
    return 0.5 * sum(jax.tree.leaves(squares), jnp.zeros(()))


def make_config(epochs=10, schedule="constant", **schedule_fields):
    config = get_config()
    config.train.epochs = epochs
    config.optimizer.lr = 0.1
    config.schedule.name = schedule
    for name, value in schedule_fields.items():
        config.schedule[name] = value
    return config


def lr_at(schedule, step):
    """The schedule under jit at an int32 step, as a Python float."""
    return float(jax.jit(schedule)(jnp.asarray(step, jnp.int32)))


def sgdr_reference(step, starts, lr_max=0.1, lr_min=1e-4):
    start = max(s for s in starts if s <= step)
    end = min(s for s in starts if s > step)
    fraction = (step - start) / (end - start)
    return lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi * fraction)) / 2


def test_constant_schedule():
    schedule = make_schedule(make_config(), steps_per_epoch=10)
    assert [lr_at(schedule, s) for s in (0, 57, 10_000)] == pytest.approx([0.1] * 3)


def test_step_schedule_changes_exactly_at_boundaries():
    config = make_config(schedule="step", boundaries=(0.5, 0.75), factor=0.1)
    schedule = make_schedule(config, steps_per_epoch=10)  # 100 steps: boundaries 50, 75
    expected = {0: 0.1, 49: 0.1, 50: 0.01, 74: 0.01, 75: 0.001, 99: 0.001}
    for step, lr in expected.items():
        assert lr_at(schedule, step) == pytest.approx(lr, rel=1e-6), step


def test_step_schedule_truncates_fractional_boundary():
    config = make_config(epochs=3, schedule="step", boundaries=(0.5,), factor=0.1)
    schedule = make_schedule(config, steps_per_epoch=7)  # int(0.5 * 21) = 10
    assert lr_at(schedule, 9) == pytest.approx(0.1)
    assert lr_at(schedule, 10) == pytest.approx(0.01)


def test_cosine_schedule_start_middle_end():
    config = make_config(schedule="cosine", min_lr=0.001)
    schedule = make_schedule(config, steps_per_epoch=10)  # 100 steps
    assert lr_at(schedule, 0) == np.float32(0.1)
    assert lr_at(schedule, 50) == pytest.approx((0.1 + 0.001) / 2, rel=1e-5)
    assert lr_at(schedule, 25) == pytest.approx(
        0.001 + 0.099 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-5)
    assert lr_at(schedule, 100) == pytest.approx(0.001, rel=1e-4)
    assert lr_at(schedule, 150) == pytest.approx(0.001, rel=1e-4)


def sgdr_config(first_period_epochs=2.0, multiplier=2.0):
    return make_config(epochs=100, schedule="sgdr", min_lr=1e-4,
                       first_period_epochs=first_period_epochs, period_multiplier=multiplier)


def test_sgdr_restarts_are_exact():
    schedule = make_schedule(sgdr_config(), steps_per_epoch=10)
    for step in (0, 20, 60, 140, 300, 620):
        assert lr_at(schedule, step) == np.float32(0.1), step


def test_sgdr_within_periods():
    schedule = make_schedule(sgdr_config(), steps_per_epoch=10)
    starts = [0, 20, 60, 140, 300]
    midpoint = (0.1 + 1e-4) / 2
    assert lr_at(schedule, 10) == pytest.approx(midpoint, rel=1e-5)
    assert lr_at(schedule, 40) == pytest.approx(midpoint, rel=1e-5)
    assert lr_at(schedule, 100) == pytest.approx(midpoint, rel=1e-5)
    for step in (1, 5, 19, 21, 59, 61, 139, 200):
        assert lr_at(schedule, step) == pytest.approx(sgdr_reference(step, starts), rel=1e-4)
    assert lr_at(schedule, 19) < 1e-3
    assert lr_at(schedule, 19) < lr_at(schedule, 18)


def test_sgdr_multiplier_one():
    schedule = make_schedule(sgdr_config(multiplier=1.0), steps_per_epoch=10)
    for step in (0, 20, 40, 980):
        assert lr_at(schedule, step) == np.float32(0.1), step
    assert lr_at(schedule, 30) == pytest.approx((0.1 + 1e-4) / 2, rel=1e-5)
    assert lr_at(schedule, 39) == pytest.approx(sgdr_reference(39, [20, 40]), rel=1e-4)


def test_sgdr_fractional_first_period():
    schedule = make_schedule(sgdr_config(first_period_epochs=0.5), steps_per_epoch=10)
    for step in (0, 5, 15, 35, 75):  # periods of 5, 10, 20, 40 steps
        assert lr_at(schedule, step) == np.float32(0.1), step
    assert lr_at(schedule, 25) == pytest.approx((0.1 + 1e-4) / 2, rel=1e-5)


def test_sgdr_restart_exact_where_float_log_rounds_down():
    # float32 log(11) / log(10) < 1: the period index needs the correction at step 110.
    schedule = make_schedule(sgdr_config(first_period_epochs=1.0, multiplier=10.0), 10)
    for step in (10, 110, 1110, 11110):
        assert lr_at(schedule, step) == np.float32(0.1), step
    assert lr_at(schedule, 109) == pytest.approx(sgdr_reference(109, [10, 110]), rel=1e-4)


def test_sgdr_doubling_cycles_end_at_first_times_powers_of_two():
    """MBCliqueNet's reading: cycles end at epochs 2, 4, 8, 16, ... (lengths 2, 2, 4, 8)."""
    config = sgdr_config()
    config.schedule.sgdr_restarts = "doubling"
    schedule = make_schedule(config, steps_per_epoch=10)
    starts = [0, 20, 40, 80, 160, 320, 640]
    for step in starts:
        assert lr_at(schedule, step) == np.float32(0.1), step
    for step in (1, 10, 19, 21, 30, 39, 41, 79, 100, 159, 161, 319, 639):
        assert lr_at(schedule, step) == pytest.approx(sgdr_reference(step, starts), rel=1e-4)
    assert lr_at(schedule, 30) == pytest.approx((0.1 + 1e-4) / 2, rel=1e-5)
    assert lr_at(schedule, 319) < 1.1e-4  # the last step of a 160-step cycle


def test_schedule_fields_are_checked_against_each_other_for_their_schedule_only():
    """A minimum rate above the maximum used to be trained (the rate rose each cycle); a
    field the chosen schedule does not read changes nothing and is not checked."""
    for name in ("cosine", "sgdr"):
        with pytest.raises(ValueError, match=re.escape(
                f"schedule.min_lr=0.5 with schedule.name={name!r} and optimizer.lr=0.1; "
                "allowed: 0 <= min_lr <= optimizer.lr")):
            make_schedule(make_config(schedule=name, min_lr=0.5), steps_per_epoch=10)
    assert make_schedule(make_config(schedule="step", min_lr=0.5), 10)(0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=re.escape("schedule.factor=-0.1 with schedule.name="
                                                   "'step'; allowed: > 0")):
        make_schedule(make_config(schedule="step", factor=-0.1), steps_per_epoch=10)
    # the value given, not the steps it makes
    with pytest.raises(ValueError, match=re.escape("schedule.first_period_epochs=-1.0 with "
                                                   "schedule.name='sgdr'; allowed: > 0")):
        make_schedule(sgdr_config(first_period_epochs=-1.0), steps_per_epoch=10)


def test_sgdr_doubling_needs_a_multiplier_above_one():
    config = sgdr_config(multiplier=1.0)
    config.schedule.sgdr_restarts = "doubling"
    with pytest.raises(ValueError, match="period_multiplier=1.0 must be > 1"):
        make_schedule(config, steps_per_epoch=10)
    config.schedule.sgdr_restarts = "halving"
    with pytest.raises(ValueError, match="schedule.sgdr_restarts='halving' is not one of"):
        make_schedule(config, steps_per_epoch=10)


# Training-set sizes (examples per epoch) of the configs' data sets; image folders: ImageNet
# (1,281,167) for CliqueNet, Tiny ImageNet (100 classes x 500) for MBCliqueNet.
TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "mnist": 60_000, "digits": 1437,
               "svhn_cropped": 73_257, "cliquenet_imagenet": 1_281_167,
               "mbcliquenet": 50_000}


def schedule_minimum(config) -> float:
    sched = config.schedule
    if sched.name in ("cosine", "sgdr"):
        return sched.min_lr
    if sched.name == "step":
        return config.optimizer.lr * sched.factor ** len(sched.boundaries)
    return config.optimizer.lr


def paper_configs():
    import importlib
    import pathlib

    for path in sorted(pathlib.Path(__file__).parents[1].joinpath("configs").glob("*.py")):
        if path.stem in ("__init__", "default"):
            continue
        module = importlib.import_module(f"configs.{path.stem}")
        for arg in (("S0", "S1", "S2", "S3") if path.stem == "cliquenet_imagenet" else (None,)):
            yield f"{path.stem}:{arg}" if arg else path.stem, module.get_config(arg)


@pytest.mark.parametrize("name,config", list(paper_configs()), ids=lambda v: str(v)[:40])
def test_every_config_trains_by_its_sources_rule(name, config):
    """MBCliqueNet: SGDR's SGD with Nesterov momentum and BinaryConnect's latent clip
    (docs/papers.md, "MBCliqueNet training rule"); CliqueNet as its authors' code: Nesterov in
    the TensorFlow CIFAR/SVHN code, plain momentum in the PyTorch ImageNet code."""
    expected = {"mbcliquenet": (True, True), "cliquenet": (True, False),
                "densenet": (True, False), "cliquenet_imagenet": (False, False)}
    opt = config.optimizer
    assert (opt.nesterov, opt.clip_latent) == expected[config.model.name], name


@pytest.mark.parametrize("name,config", list(paper_configs()), ids=lambda v: str(v)[:40])
def test_every_config_ends_at_its_schedules_minimum(name, config):
    """No config may end mid-cycle: the learning rate of its last training step is within 1%
    of its schedule's minimum (SGDR, cosine, step)."""
    data = config.data.name
    size = TRAIN_SIZES[data if data in TRAIN_SIZES else config.model.name]
    if config.data.get("svhn_extra"):
        size += 531_131
    steps_per_epoch = size // config.train.batch_size
    schedule = make_schedule(config, steps_per_epoch)
    last = config.train.epochs * steps_per_epoch - 1
    assert lr_at(schedule, last) == pytest.approx(schedule_minimum(config), rel=0.01), name


def quadratic_loss(params):
    curvature = {"kernel": jnp.array([1.0, 3.0]), "bias": jnp.array([2.0])}
    return sum(0.5 * jnp.sum(curvature[k] * params[k] ** 2) for k in params)


def run_two_steps(optimizer, params, loss_fn=quadratic_loss):
    state = optimizer.init(params)
    trajectory = [params]
    for _ in range(2):
        grads = jax.grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
    return trajectory


def hand_sgd(w, curvature, lr, momentum, nesterov, wd):
    """Two SGD steps in float64: velocity v = m*v + g; step lr*(g + m*v) if Nesterov else lr*v."""
    velocity = np.zeros_like(w)
    trajectory = [w]
    for _ in range(2):
        grad = curvature * w + wd * w
        velocity = momentum * velocity + grad
        w = w - lr * (grad + momentum * velocity if nesterov else velocity)
        trajectory.append(w)
    return trajectory


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_sgd_matches_hand_computed_updates(nesterov, weight_decay):
    config = make_config()
    config.optimizer.update(momentum=0.9, nesterov=nesterov, weight_decay=weight_decay,
                            weight_decay_on="all")
    optimizer, _ = make_optimizer(config, steps_per_epoch=10)
    params = {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5])}
    trajectory = run_two_steps(optimizer, params)
    curvature = {"kernel": np.array([1.0, 3.0]), "bias": np.array([2.0])}
    for name in params:
        expected = hand_sgd(np.asarray(params[name], np.float64), curvature[name], 0.1, 0.9,
                            nesterov, weight_decay)
        for got, want in zip(trajectory, expected, strict=True):
            np.testing.assert_allclose(got[name], want, rtol=1e-6)


def test_nesterov_differs_from_plain_momentum():
    config = make_config()
    params = {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5])}
    finals = []
    for nesterov in (False, True):
        config.optimizer.nesterov = nesterov
        finals.append(run_two_steps(make_optimizer(config, 10)[0], params)[-1]["kernel"])
    assert not np.allclose(finals[0], finals[1])


def test_weight_decay_equals_l2_in_loss():
    config = make_config()
    config.optimizer.update(weight_decay=0.05, weight_decay_on="kernels", nesterov=True)
    params = {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5])}
    mask = weight_decay_mask(params, "kernels")
    with_decay = run_two_steps(make_optimizer(config, 10)[0], params)
    config.optimizer.weight_decay = 0.0
    loss_with_l2 = lambda p: quadratic_loss(p) + 0.05 * l2_penalty(p, mask)
    with_penalty = run_two_steps(make_optimizer(config, 10)[0], params, loss_with_l2)
    for got, want in zip(with_decay, with_penalty, strict=True):
        for name in params:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6)
    bias_without_decay = run_two_steps(make_optimizer(config, 10)[0], params)[-1]["bias"]
    np.testing.assert_allclose(with_decay[-1]["bias"], bias_without_decay, rtol=1e-7)


def test_optimizer_by_name_equals_optax_with_the_configs_arguments():
    """`optimizer.name` names any Optax optimizer: it gets the schedule as learning rate and
    `optimizer.kwargs`; L2 decay (`optimizer.weight_decay`) is added to the gradient first,
    and an optimizer with its own decoupled decay gets the `weight_decay_on` mask."""
    params = {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5])}
    for name, text, kwargs in (("adamw", "b1=0.8, weight_decay=0.01",
                                {"b1": 0.8, "weight_decay": 0.01}),
                               ("lamb", "eps=1e-5", {"eps": 1e-5}), ("adam", "", {})):
        config = make_config(schedule="cosine", min_lr=0.001)
        config.optimizer.update(name=name, weight_decay=0.05, weight_decay_on="kernels",
                                kwargs=text)
        optimizer, schedule = make_optimizer(config, steps_per_epoch=10)
        mask = lambda p: weight_decay_mask(p, "kernels")
        extra = {"mask": mask} if name in ("adamw", "lamb") else {}
        expected = optax.chain(optax.add_decayed_weights(0.05, mask=mask),
                               getattr(optax, name)(schedule, **kwargs, **extra))
        for got, want in zip(run_two_steps(optimizer, params), run_two_steps(expected, params),
                             strict=True):
            jax.tree.map(np.testing.assert_array_equal, got, want)
        moved = run_two_steps(optimizer, params)[-1]["kernel"]
        assert not np.allclose(moved, params["kernel"]), name


def test_sgd_kwargs_override_the_momentum_fields():
    config = make_config()
    config.optimizer.update(momentum=0.9, weight_decay=0.0)
    config.optimizer.kwargs = "momentum=0.5"
    params = {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5])}
    got = run_two_steps(make_optimizer(config, 10)[0], params)[-1]
    want = run_two_steps(optax.sgd(0.1, momentum=0.5), params)[-1]
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("name,kwargs,message", [
    ("adamx", "", "optimizer.name='adamx' is not an Optax optimizer"),
    ("chain", "", "optimizer.name='chain' is not an Optax optimizer"),
    ("adamw", "beta1=0.9", "optimizer.kwargs.beta1 is not an argument of optax.adamw"),
    ("sgd", "nesterow=True", "optimizer.kwargs.nesterow is not an argument of optax.sgd")] + [
    ("adamw", text, f"optimizer.kwargs={text!r} cannot be read; allowed: keyword arguments "
                    "of optax.adamw as Python literals, e.g. b1=0.9, eps=1e-8")
    for text in ("0.9", "b1", "b1=", "b1=0.9,, b2=0.99", "b1=max(0.9, 0.8)", "**{'b1': 0.9}",
                 "b1=0.9, b1=0.8", "b1=0.9), print(1", "b1: 0.9")])
def test_unknown_optimizer_or_argument_is_a_one_line_error(name, kwargs, message):
    config = make_config()
    config.optimizer.update(name=name, kwargs=kwargs)
    with pytest.raises(ValueError) as error:
        make_optimizer(config, steps_per_epoch=10)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert "allowed" in str(error.value)


def test_kwargs_are_python_literals_as_written_in_the_call():
    assert optimizer_kwargs(make_config().optimizer, None) == {"momentum": 0.9, "nesterov": False}
    config = make_config()
    config.optimizer.update(name="adamw", kwargs=" b1=0.95,\n eps=-1e-8, mu_dtype=None, ")
    assert optimizer_kwargs(config.optimizer, None) == {
        "b1": 0.95, "eps": -1e-8, "mu_dtype": None, "mask": None}


def test_kwargs_as_a_dict_from_an_older_run_still_apply():
    """Runs made when `optimizer.kwargs` was a ConfigDict hold a dict in config.json."""
    written = make_config().to_dict()
    written["optimizer"].update(name="adamw", kwargs={"b1": 0.8})
    older = ml_collections.ConfigDict(json.loads(json.dumps(written)))
    config = make_config()
    config.optimizer.update(name="adamw", kwargs="b1=0.8")
    params = {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5])}
    for got, want in zip(run_two_steps(make_optimizer(older, 10)[0], params),
                         run_two_steps(make_optimizer(config, 10)[0], params), strict=True):
        jax.tree.map(np.testing.assert_array_equal, got, want)


def test_kwargs_on_the_command_line_reach_the_optax_optimizer():
    """launch.py's locked config has override flags only for existing fields: kwargs is a
    string field, so `--config.optimizer.kwargs=...` exists and sets optax.adamw's b1."""
    config = launch_config(["launch.py", "--config=configs/mbclique_digits.py",
                            "--config.optimizer.name=adamw", "--config.optimizer.kwargs=b1=0.95",
                            "--config.optimizer.weight_decay=0", "--config.schedule.name=constant"])
    optimizer, _ = make_optimizer(config, steps_per_epoch=10)
    params = {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5])}
    got = run_two_steps(optimizer, params)
    for b1, same in ((0.95, True), (0.9, False)):
        want = run_two_steps(optax.adamw(config.optimizer.lr, b1=b1), params)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got),
                                                       jax.tree.leaves(want),
                                                       strict=True)) == same, b1


def real_params(config_module):
    """The parameter tree of a config's model, as shapes (`jax.eval_shape` of its init)."""
    config = config_module.get_config()
    model = build_model(config, 10)
    return bits.abstract_variables(model, (32, 32, 3))["params"]


def names_where(params, mask, value: bool) -> set[str]:
    flat = jax.tree_util.tree_leaves_with_path(params)
    return {names.leaf_name(path) for (path, _), on in zip(flat, jax.tree.leaves(mask),
                                                          strict=True) if on == value}


def test_weight_decay_on_kernels_decays_mbcliquenet_m_filters_and_latent_kernels():
    params = real_params(mbclique_cifar10)
    decayed = names_where(params, weight_decay_mask(params, "kernels"), True)
    assert names.M_FILTER in decayed  # one per block, modulating its 3x3 convs
    assert {"kernel", "W_bottleneck_1", "W_0to1", "W_2to1"} <= decayed  # latent kernels
    assert not any(n.startswith("BN") or n in ("scale", "bias") for n in decayed)
    kept = names_where(params, weight_decay_mask(params, "kernels"), False)
    assert kept == {"scale", "bias"}  # BatchNorm only (the head is a conv, no bias)


def test_weight_decay_on_kernels_on_cliquenet():
    params = real_params(cliquenet_cifar10)
    mask = weight_decay_mask(params, "kernels")
    assert names_where(params, mask, False) == {"scale", "bias"}  # BN, classifier bias
    assert mask["classifier"] == {"kernel": True, "bias": False}
    assert mask["stem"] == {"kernel": True}
    assert all(mask["block1"][f"W_{j}to{i}"] for i in range(1, 5) for j in range(5) if j != i)
    assert not any(jax.tree.leaves(mask["block1"]["BN_I_1"]))


def test_weight_decay_mask_all():
    params = real_params(mbclique_cifar10)
    mask = weight_decay_mask(params, "all")
    assert jax.tree.leaves(mask) == [True] * len(jax.tree.leaves(params))


def test_l2_penalty_sums_masked_squares():
    params = {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([3.0])}
    assert float(l2_penalty(params, {"kernel": True, "bias": False})) == pytest.approx(2.5)
    assert float(l2_penalty(params, {"kernel": True, "bias": True})) == pytest.approx(7.0)


def test_unknown_schedule_name():
    with pytest.raises(ValueError, match="schedule.name='foo' is not one of: constant, cosine"):
        make_schedule(make_config(schedule="foo"), steps_per_epoch=10)


def test_unknown_weight_decay_target():
    with pytest.raises(ValueError, match="'bogus'"):
        weight_decay_mask({"kernel": jnp.ones(2)}, "bogus")


@pytest.mark.parametrize(
    "field, value",
    [("lr", 0.0), ("lr", -0.1), ("momentum", 1.0), ("momentum", -0.5),
     ("weight_decay", -1e-4), ("weight_decay_on", "bogus")],
)
def test_bad_optimizer_settings(field, value):
    config = make_config()
    config.optimizer[field] = value
    with pytest.raises(ValueError, match=re.escape(f"optimizer.{field}={value!r}")):
        make_optimizer(config, steps_per_epoch=10)


def test_train_epochs_may_change_on_resume_only_where_the_schedule_ignores_them():
    """Constant and SGDR rates do not depend on train.epochs (a resumed run with more epochs
    trains its steps as before); step and cosine schedules spread over them: refused, saying
    why."""
    from cliquejax.train import run_dir

    for name in ("constant", "sgdr", "cosine", "step"):
        old = json.loads(get_config().to_json())
        old["schedule"]["name"] = name
        new = json.loads(json.dumps(old))
        new["train"]["epochs"] = old["train"]["epochs"] + 2
        refused, allowed = run_dir.config_differences(old, new)
        if name in ("constant", "sgdr"):
            assert refused == [] and allowed == {"train.epochs": [1, 3]}
        else:
            assert refused == [f"train.epochs: 1 -> 3 (schedule.name={name!r} spreads over "
                               "train.epochs: the steps trained had other rates; constant "
                               "and sgdr schedules may change it)"] and allowed == {}
