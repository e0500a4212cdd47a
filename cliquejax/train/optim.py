"""Learning-rate schedules, weight-decay masks and the optimizer (SPEC sections 1-3).

Schedules are functions of the integer optimizer step (jit-able). Weight decay is L2 added
to the gradient before momentum, which equals adding wd/2 * sum(w^2) to the loss, as the
original CliqueNet does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from cliquejax import names

SCHEDULE_NAMES = ("constant", "cosine", "sgdr", "step")
OPTIMIZER_NAMES = ("sgd",)
WEIGHT_DECAY_TARGETS = ("all", "kernels")


def _not_one_of(field: str, value, allowed) -> ValueError:
    return ValueError(f"{field}={value!r} is not one of: {', '.join(sorted(allowed))}")


def _cosine_between(lr_max: float, lr_min: float, fraction):
    """lr_max at fraction 0, lr_min at fraction 1; exactly lr_max when fraction is 0."""
    return lr_max - (lr_max - lr_min) * (1.0 - jnp.cos(jnp.pi * fraction)) / 2.0


def _constant_schedule(lr: float) -> optax.Schedule:
    return lambda step: jnp.full((), lr, jnp.float32)


def _step_schedule(lr: float, factor: float, fractions, total_steps: int) -> optax.Schedule:
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"schedule.boundaries={tuple(fractions)!r} must be fractions in [0, 1]")
    boundary_steps = jnp.asarray([int(f * total_steps) for f in fractions], jnp.int32)

    def schedule(step):
        decays_done = jnp.sum(jnp.asarray(step) >= boundary_steps)
        return jnp.asarray(lr * factor**decays_done, jnp.float32)

    return schedule


def _cosine_schedule(lr: float, min_lr: float, total_steps: int) -> optax.Schedule:
    def schedule(step):
        fraction = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
        return _cosine_between(lr, min_lr, fraction)

    return schedule


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
      2, 2, 4, 8, ...). MBCliqueNet's reading (section 4: periods "2 epochs, and then 4, 8,
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
    """Cosine from lr to min_lr within each cycle, restarting at lr (SGDR)."""
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


def make_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate as a function of the optimizer step, from `config.schedule`."""
    sched = config.schedule
    lr = float(config.optimizer.lr)
    total_steps = int(config.train.epochs) * int(steps_per_epoch)
    if sched.name == "constant":
        return _constant_schedule(lr)
    if sched.name == "step":
        return _step_schedule(lr, float(sched.factor), tuple(sched.boundaries), total_steps)
    if sched.name == "cosine":
        return _cosine_schedule(lr, float(sched.min_lr), total_steps)
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
            lambda path, _: names.is_kernel(names.leaf_name(path)), params)
    raise _not_one_of("optimizer.weight_decay_on", on, WEIGHT_DECAY_TARGETS)


def l2_penalty(params, mask):
    """0.5 * sum of squares of the leaves where `mask` is True."""
    squares = jax.tree.map(
        lambda leaf, decayed: jnp.sum(jnp.square(leaf)) if decayed else jnp.zeros(()),
        params, mask)
    return 0.5 * sum(jax.tree.leaves(squares), jnp.zeros(()))


def _validate_optimizer(opt) -> None:
    if opt.name not in OPTIMIZER_NAMES:
        raise _not_one_of("optimizer.name", opt.name, OPTIMIZER_NAMES)
    if not opt.lr > 0:
        raise ValueError(f"optimizer.lr={opt.lr!r} must be > 0")
    if not 0 <= opt.momentum < 1:
        raise ValueError(f"optimizer.momentum={opt.momentum!r} must be in [0, 1)")
    if not opt.weight_decay >= 0:
        raise ValueError(f"optimizer.weight_decay={opt.weight_decay!r} must be >= 0")
    if opt.weight_decay_on not in WEIGHT_DECAY_TARGETS:
        raise _not_one_of("optimizer.weight_decay_on", opt.weight_decay_on, WEIGHT_DECAY_TARGETS)


def flat_decay_rate(params, mask, weight_decay: float):
    """The decay rate of every element of `ravel_pytree(params)`: weight_decay where `mask`
    is True, else 0. A scalar when the mask is uniform (the default `weight_decay_on="all"`):
    a per-element vector is rebuilt in every step, one more pass over the parameters' size
    (CliqueNet-S0's update, as in the step: 69-71 -> 58-63 ms with the scalar)."""
    decayed = jax.tree.leaves(mask)
    if all(decayed):
        return weight_decay
    if not any(decayed):
        return 0.0
    rate = jax.tree.map(lambda leaf, on: jnp.full(leaf.shape, weight_decay * on, leaf.dtype),
                        params, mask)
    return ravel_pytree(rate)[0]


def decay_then_flat(inner: optax.GradientTransformation, weight_decay: float, mask_fn):
    """`optax.chain(optax.add_decayed_weights(weight_decay, mask=mask_fn),
    optax.flatten(inner))` with the decay added to the flat gradient: the same arithmetic
    and the same state, but XLA compiles one decay kernel instead of one per parameter
    (CliqueNet k=36 T=12: 111 kernels fewer)."""
    decay = optax.add_decayed_weights(weight_decay, mask=mask_fn)

    def init(params):
        return decay.init(params), inner.init(ravel_pytree(params)[0])

    def update(updates, state, params):
        decay_state, inner_state = state
        rate = flat_decay_rate(params, mask_fn(params), weight_decay)
        flat_params = ravel_pytree(params)[0]
        flat_grads, unravel = ravel_pytree(updates)
        flat_updates, inner_state = inner.update(flat_grads + rate * flat_params, inner_state,
                                                 flat_params)
        return unravel(flat_updates), (decay_state, inner_state)

    return optax.GradientTransformation(init, update)


def make_optimizer(config, steps_per_epoch: int):
    """(optax SGD with momentum, Nesterov switch and masked L2 decay, its lr schedule)."""
    opt = config.optimizer
    _validate_optimizer(opt)
    schedule = make_schedule(config, steps_per_epoch)
    sgd = optax.sgd(schedule, momentum=float(opt.momentum) or None, nesterov=bool(opt.nesterov))
    if opt.weight_decay == 0:
        # flat: the momentum is one vector, so XLA compiles one update kernel instead of
        # one per parameter (fewer kernels, faster compile; same arithmetic per element)
        return optax.flatten(sgd), schedule
    decay_target = opt.weight_decay_on
    return decay_then_flat(sgd, float(opt.weight_decay),
                           lambda params: weight_decay_mask(params, decay_target)), schedule
