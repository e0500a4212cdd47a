"""Learning-rate schedules, weight-decay masks and the optimizer, from Optax.

Schedules are functions of the integer optimizer step (jit-able): Optax's own where they give
the values the papers' recipes need (constant; step decay, CliqueNet's CIFAR recipe; cosine),
SGDR written here (MBCliqueNet section 3.1: restarts at 2, 4, 8, ... epochs). The optimizer is
any Optax optimizer named by `config.optimizer.name` (SGD with momentum for both papers).
Weight decay is L2 added to the gradient before the optimizer (`optax.add_decayed_weights`),
which equals adding wd/2 * sum(w^2) to the loss, as the original CliqueNet does.
"""

from __future__ import annotations

import ast
import inspect
import math

import jax
import jax.numpy as jnp
import optax

from cliquejax import names

SCHEDULE_NAMES = ("constant", "cosine", "sgdr", "step")
# Optimizers of `optax` to name in an error; any function of `optax` that takes a
# `learning_rate` may be named.
OPTIMIZER_EXAMPLES = ("sgd", "adam", "adamw", "lamb", "lion", "rmsprop")
WEIGHT_DECAY_TARGETS = ("all", "kernels")


def _not_one_of(field: str, value, allowed) -> ValueError:
    return ValueError(f"{field}={value!r} is not one of: {', '.join(sorted(allowed))}")


def _cosine_between(lr_max: float, lr_min: float, fraction):
    """lr_max at fraction 0, lr_min at fraction 1; exactly lr_max when fraction is 0."""
    return lr_max - (lr_max - lr_min) * (1.0 - jnp.cos(jnp.pi * fraction)) / 2.0


def _step_schedule(lr: float, factor: float, fractions, total_steps: int) -> optax.Schedule:
    """lr, times `factor` from each boundary on (a fraction of training, truncated to a step)."""
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"schedule.boundaries={tuple(fractions)!r} must be fractions in [0, 1]")
    scales: dict[int, float] = {}
    for f in fractions:  # two fractions on one step decay twice there
        step = int(f * total_steps)
        scales[step] = scales.get(step, 1.0) * factor
    return optax.piecewise_constant_schedule(lr, scales)


SGDR_RESTARTS = ("doubling", "summed")


def _snap(start):
    """`start` snapped to the nearest integer step when within float error of it."""
    nearest_step = jnp.round(start)
    float_error = 1e-6 * jnp.maximum(jnp.abs(start), 1.0)
    return jnp.where(jnp.abs(start - nearest_step) <= float_error, nearest_step, start)


def _sgdr_cycle_start(first: float, multiplier: float, restarts: str, index):
    """Step at which cycle `index` starts.

    summed: cycle i lasts first * multiplier**i (Loshchilov & Hutter's T_mult), so cycles end
      at first, first * (1 + m), ...: for 2 epochs and m = 2 at epochs 2, 6, 14, 30, ...
    doubling: cycles end at first * multiplier**i, i.e. at epochs 2, 4, 8, 16, ... (lengths
      2, 2, 4, 8, ...). MBCliqueNet's reading (section 3.1: periods "2 epochs, and then 4, 8,
      16, 32, 64, 128" with 32 and 256 epochs of training, and Fig. 3 comparing the 64th and
      256th epochs): every run length of the paper ends a cycle at the minimum rate."""
    if restarts == "doubling":
        start = jnp.where(index > 0, first * jnp.power(multiplier, index - 1.0), 0.0)
    elif multiplier == 1.0:
        start = first * index
    else:
        start = first * (jnp.power(multiplier, index) - 1.0) / (multiplier - 1.0)
    return _snap(start)


def _sgdr_schedule(lr: float, min_lr: float, first: float, multiplier: float,
                   restarts: str = "summed"):
    """Cosine from lr to min_lr within each cycle, restarting at lr (SGDR, Loshchilov &
    Hutter 2017). Written here rather than with `optax.sgdr_schedule`, which joins a finite
    list of cycles of whole steps: cycles here may start between steps (fractional epochs),
    go on for as long as training does, and follow either restart rule."""
    if first <= 0:
        raise ValueError(f"schedule.first_period_epochs gives {first!r} steps, need > 0")
    if restarts not in SGDR_RESTARTS:
        raise _not_one_of("schedule.sgdr_restarts", restarts, SGDR_RESTARTS)
    if multiplier < 1.0 or (restarts == "doubling" and multiplier == 1.0):
        low = "> 1 with schedule.sgdr_restarts='doubling'" if restarts == "doubling" else ">= 1"
        raise ValueError(f"schedule.period_multiplier={multiplier!r} must be {low}")
    cycle_start = lambda index: _sgdr_cycle_start(first, multiplier, restarts, index)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if multiplier == 1.0:
            index = jnp.floor(step / first)
        elif restarts == "doubling":
            ratio = jnp.maximum(step / first, 1.0)
            index = jnp.where(step < first, 0.0,
                              jnp.floor(jnp.log(ratio) / math.log(multiplier)) + 1.0)
        else:
            periods = 1.0 + step * (multiplier - 1.0) / first
            index = jnp.floor(jnp.log(periods) / math.log(multiplier))
        # The float index can be one off next to a restart; correct it against the starts
        # themselves so that step == cycle start always lands at t = 0.
        index = jnp.where(cycle_start(index) > step, index - 1.0, index)
        index = jnp.where(cycle_start(index + 1.0) <= step, index + 1.0, index)
        start = cycle_start(index)
        length = cycle_start(index + 1.0) - start
        since_start = jnp.maximum(step - start, 0.0)
        return _cosine_between(lr, min_lr, since_start / length)

    return schedule


def check_schedule(sched, lr: float) -> None:
    """The fields `sched.name` reads, each against its range and the others, in the order
    of the config (a field another schedule reads is not checked: it changes nothing)."""
    if sched.name in ("cosine", "sgdr") and not 0 <= sched.min_lr <= lr:
        raise ValueError(f"schedule.min_lr={sched.min_lr!r} with schedule.name={sched.name!r} "
                         f"and optimizer.lr={lr!r}; allowed: 0 <= min_lr <= optimizer.lr (the "
                         "rate falls from optimizer.lr to min_lr)")
    if sched.name == "step" and not sched.factor > 0:
        raise ValueError(f"schedule.factor={sched.factor!r} with schedule.name='step'; "
                         "allowed: > 0 (the rate is multiplied by it at each boundary)")
    if sched.name == "sgdr" and not sched.first_period_epochs > 0:
        raise ValueError(f"schedule.first_period_epochs={sched.first_period_epochs!r} with "
                         "schedule.name='sgdr'; allowed: > 0")


def make_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate as a function of the optimizer step, from `config.schedule`."""
    sched = config.schedule
    lr = float(config.optimizer.lr)
    check_schedule(sched, lr)
    total_steps = int(config.train.epochs) * int(steps_per_epoch)
    if sched.name == "constant":
        return optax.constant_schedule(jnp.float32(lr))
    if sched.name == "step":
        return _step_schedule(lr, float(sched.factor), tuple(sched.boundaries), total_steps)
    if sched.name == "cosine":
        return optax.cosine_decay_schedule(lr, max(total_steps, 1),
                                           alpha=float(sched.min_lr) / lr)
    if sched.name == "sgdr":
        first_period = float(sched.first_period_epochs) * steps_per_epoch
        return _sgdr_schedule(lr, float(sched.min_lr), first_period,
                              float(sched.period_multiplier),
                              sched.get("sgdr_restarts", "summed"))
    raise _not_one_of("schedule.name", sched.name, SCHEDULE_NAMES)


def weight_decay_mask(params, on: str):
    """A pytree of bools like `params`: True where weight decay applies."""
    if on == "all":
        return jax.tree.map(lambda _: True, params)
    if on == "kernels":
        return jax.tree_util.tree_map_with_path(
            lambda path, _: names.is_kernel_path(path), params)
    raise _not_one_of("optimizer.weight_decay_on", on, WEIGHT_DECAY_TARGETS)


def _validate_optimizer(opt) -> None:
    if not 0 < opt.lr < math.inf:
        raise ValueError(f"optimizer.lr={opt.lr!r}; allowed: a finite rate > 0")
    if opt.name == "sgd" and not 0 <= opt.momentum < 1:
        raise ValueError(f"optimizer.momentum={opt.momentum!r}; allowed: 0 <= momentum < 1")
    if not 0 <= opt.weight_decay < math.inf:
        raise ValueError(f"optimizer.weight_decay={opt.weight_decay!r}; allowed: a finite "
                         "decay >= 0")
    if opt.weight_decay_on not in WEIGHT_DECAY_TARGETS:
        raise _not_one_of("optimizer.weight_decay_on", opt.weight_decay_on, WEIGHT_DECAY_TARGETS)


def optax_optimizer(name: str):
    """`optax.<name>`, a function taking `learning_rate` that returns a transformation."""
    fn = getattr(optax, name, None) if isinstance(name, str) and name[:1] != "_" else None
    try:
        takes_lr = callable(fn) and "learning_rate" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_lr = False
    if not takes_lr:
        raise ValueError(f"optimizer.name={name!r} is not an Optax optimizer (a function of "
                         f"optax taking learning_rate); allowed e.g.: "
                         f"{', '.join(OPTIMIZER_EXAMPLES)}")
    return fn


def parse_kwargs(kwargs, name: str) -> dict:
    """`optimizer.kwargs` as a dict: a string of keyword arguments written as in the call
    (`"b1=0.9, eps=1e-8"`), so that it can be set on the command line, where only existing
    fields can be overridden; or a dict, as older runs' config.json hold it."""
    if not isinstance(kwargs, str):
        return kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs)
    try:
        call = ast.parse(f"f({kwargs})", mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise ValueError("not keyword arguments only")
        keys = [keyword.arg for keyword in call.keywords]
        if None in keys or len(set(keys)) < len(keys):
            raise ValueError("a **mapping, or a name given twice")
        return {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        raise ValueError(f"optimizer.kwargs={kwargs!r} cannot be read; allowed: keyword "
                         f"arguments of optax.{name} as Python literals, e.g. b1=0.9, "
                         "eps=1e-8") from None


def optimizer_kwargs(opt, params_fn) -> dict:
    """The keyword arguments of `optax.<opt.name>` besides the learning rate:
    `optimizer.kwargs`, and for `sgd` the fields `optimizer.momentum` (0: none) and
    `optimizer.nesterov` unless `optimizer.kwargs` sets them. An optimizer with its own
    (decoupled) weight decay and a `mask` argument (adamw, lamb, ...) gets the mask of
    `optimizer.weight_decay_on` unless `optimizer.kwargs` sets one."""
    fn = optax_optimizer(opt.name)
    given = parse_kwargs(opt.get("kwargs", ""), opt.name)
    allowed = [p for p in inspect.signature(fn).parameters if p != "learning_rate"]
    for key in given:
        if key not in allowed:
            raise ValueError(f"optimizer.kwargs.{key} is not an argument of optax.{opt.name}; "
                             f"allowed: {', '.join(allowed)}")
    kwargs = {}
    if opt.name == "sgd":
        kwargs = {"momentum": float(opt.momentum) or None, "nesterov": bool(opt.nesterov)}
    if "mask" in allowed and "weight_decay" in allowed:
        kwargs["mask"] = params_fn
    kwargs.update(given)
    return kwargs


def make_optimizer(config, steps_per_epoch: int):
    """(the optimizer, its learning-rate schedule): `optax.<optimizer.name>` with the
    schedule as its learning rate and `optimizer_kwargs`, after L2 weight decay
    (`optimizer.weight_decay` times the parameters where `optimizer.weight_decay_on` says,
    added to the gradient)."""
    opt = config.optimizer
    _validate_optimizer(opt)
    schedule = make_schedule(config, steps_per_epoch)
    decay_target = opt.weight_decay_on
    mask_fn = lambda params: weight_decay_mask(params, decay_target)
    fn = optax_optimizer(opt.name)
    kwargs = optimizer_kwargs(opt, mask_fn)
    try:
        inner = fn(schedule, **kwargs)
    except (TypeError, ValueError) as error:
        text = " ".join(str(error).split())
        shown = {key: value for key, value in kwargs.items() if key != "mask"}
        raise ValueError(f"optimizer.kwargs={shown!r} do not suit optax.{opt.name}: "
                         f"{text}") from None
    if opt.weight_decay == 0:
        return inner, schedule
    decay = optax.add_decayed_weights(float(opt.weight_decay), mask=mask_fn)
    return optax.chain(decay, inner), schedule
