"""The training state and the jitted, sharded train / eval steps.

The state is a plain dict `{"step", "params", "batch_stats", "opt_state"}` (what Orbax
saves). Steps are pure: the loop around them owns every side effect. The mesh has one
`data` axis over every device of every host; the batch is sharded on it and the state is
replicated, so BatchNorm sees the statistics of the global batch (the mean over the
sharded batch axis is a cross-device reduction inserted by XLA). With
`train.bn_statistics="per_device"` the step runs per device under `jax.shard_map` instead:
each device normalises with the statistics of its own shard, and the step's only
collectives are ours (`train_step`'s `axis_name`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cliquejax import binary, kernels, names, platform

# `train.bn_statistics`: whose batch BatchNorm normalises with on several devices.
# global: the whole global batch's (the default, and what every run before the field ran: an
# absent field reads as global, so a run resumes as it trained; 8 devices equal 1).
# per_device: each device's own shard, as PyTorch DataParallel/DDP without SyncBN computes,
# which is what MBCliqueNet's two-GPU PyTorch runs did (section 3.1), and Flax's ImageNet
# example; the running statistics are averaged over the devices after each step, and the
# step's collectives are one all-reduce of the gradients (with the loss, accuracy and those
# statistics) per update.
BN_STATISTICS = ("global", "per_device")


def bn_statistics(train) -> str:
    """`train.bn_statistics`, checked; `global` where the field is absent (older runs)."""
    value = train.get("bn_statistics", "global")
    if value not in BN_STATISTICS:
        raise ValueError(f"train.bn_statistics={value!r} is not a choice; allowed: "
                         f"{', '.join(BN_STATISTICS)}")
    return value


@dataclasses.dataclass(frozen=True)
class Shardings:
    mesh: jax.sharding.Mesh
    batch: NamedSharding
    replicated: NamedSharding


def make_shardings(global_batch_size: int, devices=None) -> Shardings:
    """The batch sharded over every device (`devices`: these instead of `jax.devices()`,
    e.g. the simulated GPUs of `cliquejax.lower --compile`), the state replicated."""
    chosen = list(devices) if devices is not None else jax.devices()
    devices = len(chosen)
    if global_batch_size % devices:
        raise ValueError(f"train.batch_size={global_batch_size} is not divisible by the "
                         f"{devices} devices; allowed: a multiple of {devices}")
    # Auto axes: XLA propagates the batch sharding (the default Explicit axes of recent JAX
    # would make every op's sharding part of its type).
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=chosen)
    return Shardings(mesh, NamedSharding(mesh, P("data")), NamedSharding(mesh, P()))


def global_batch(local_batch: dict, shardings: Shardings) -> dict:
    """Process-local numpy batch -> global arrays sharded over the `data` axis."""
    if jax.process_count() == 1:  # the whole batch in one call: a quarter less host time
        return jax.device_put(dict(local_batch), shardings.batch)
    return {key: jax.make_array_from_process_local_data(shardings.batch, np.asarray(value))
            for key, value in local_batch.items()}


def m_filter_mask(params):
    """True at the M-filters, for the alternating update of MBCliqueNet."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: names.leaf_name(path) == names.M_FILTER, params)


def make_transforms(config, tx: optax.GradientTransformation, params):
    """One transform, or two (latent filters first, then M-filters) for the alternating
    update of MBCliqueNet (section 2.3, eqs. 6-7)."""
    if config.model.get("update_order", "simultaneous") != "alternating":
        return (tx,)
    m_mask = m_filter_mask(params)
    not_m = jax.tree.map(lambda b: not b, m_mask)
    only = lambda mask, other: optax.chain(optax.masked(tx, mask),
                                           optax.masked(optax.set_to_zero(), other))
    return only(not_m, m_mask), only(m_mask, not_m)


def clip_latent(params, latent_mask):
    """`params` with the leaves where `latent_mask` is True clipped to [-1, 1]: the update
    rule of BinaryConnect [6] and BNN [7] for the full-precision weights behind a sign
    (MBCliqueNet section 2.3 follows them), applied after each optimizer step. The STE's clip
    (`binary.ste_sign`) is another thing: it cancels the gradient where |C| > 1."""
    return jax.tree.map(lambda p, clip: jnp.clip(p, -1.0, 1.0) if clip else p,
                        params, latent_mask)


def init_state(model, transforms, image_shape, seed: int) -> dict:
    images = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init(jax.random.PRNGKey(seed), images, train=False)
    params = variables["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "batch_stats": variables.get("batch_stats", {}),
            "opt_state": tuple(t.init(params) for t in transforms)}


def initial_state(model, transforms, image_shape, seed: int, sharding) -> dict:
    """`init_state` computed under `jit`, placed with `sharding`, with the compiler options
    of the backend for a program that runs once (`platform.init_compiler_options`)."""
    init = jax.jit(lambda: init_state(model, transforms, image_shape, seed),
                   out_shardings=sharding)
    return init.lower().compile(compiler_options=platform.init_compiler_options())()


def cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def _loss_fn(model, state, batch, rng):
    def loss(params):
        logits, new_vars = model.apply(
            {"params": params, "batch_stats": state["batch_stats"]}, batch["image"],
            train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
        ce = jnp.mean(cross_entropy(logits, batch["label"]))
        return ce, (logits, new_vars["batch_stats"])
    return loss


def keep_if(finite, new, old):
    """`new` where `finite` holds, else `old`, leaf by leaf: a bad update is never kept."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def train_step(state, batch, *, model, transforms, schedule: Callable, seed: int,
               binary_mask=None, clip_mask=None, axis_name=None):
    """One SGD step. A non-finite loss or gradient leaves the state unchanged and reports
    `finite = 0`, so a bad update is never kept (or saved). `clip_mask` (None: no clip):
    the latent weights `clip_latent` keeps in [-1, 1] after each update. `axis_name` (under
    `jax.shard_map`, `train.bn_statistics="per_device"`): `batch` is this device's shard;
    its gradients, loss, accuracy and new BatchNorm statistics are averaged over the axis
    in one `pmean` per update, so the state stays the same on every device."""
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state["step"])
    if axis_name is not None:  # each shard its own dropout masks
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    loss = _loss_fn(model, state, batch, rng)
    global_norm = kernels.grad_norm(model)
    params, opt_states, finite = state["params"], [], jnp.array(True)
    for idx, tx in enumerate(transforms):  # one pass, or C then M (alternating update)
        (ce, (logits, batch_stats)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        if axis_name is not None:  # the one all-reduce of this update
            grads, ce, accuracy, batch_stats = jax.lax.pmean(
                (grads, ce, accuracy, batch_stats), axis_name)
        grad_norm = global_norm(grads)
        if idx == 0:
            first = ce, accuracy, batch_stats, grad_norm
        updates, opt_state = tx.update(grads, state["opt_state"][idx], params)
        params = optax.apply_updates(params, updates)
        if clip_mask is not None:  # after each update: the M step sees the clipped C
            params = clip_latent(params, clip_mask)
        opt_states.append(opt_state)
        finite &= jnp.isfinite(ce) & jnp.isfinite(grad_norm)
    ce, accuracy, batch_stats, grad_norm = first
    new_state = {"step": state["step"] + 1, "params": params, "batch_stats": batch_stats,
                 "opt_state": tuple(opt_states)}
    new_state = keep_if(finite, new_state, state)
    metrics = {"loss": ce, "accuracy": accuracy,
               "lr": schedule(state["step"]), "grad_norm": grad_norm,
               "finite": finite.astype(jnp.float32)}
    if binary_mask is not None:
        binary_leaves = lambda tree: [leaf for leaf, is_binary in zip(
            jax.tree.leaves(tree), jax.tree.leaves(binary_mask), strict=True) if is_binary]
        if binary_leaves(state["params"]):  # one reduction over the concatenated leaves
            flat = lambda tree: jnp.concatenate([jnp.ravel(x) for x in binary_leaves(tree)])
            metrics["flip_ratio"] = binary.flip_ratio(flat(state["params"]),
                                                      flat(new_state["params"]))
    return new_state, metrics


def eval_step(state, batch, *, model):
    """Sums over the real (mask = 1) examples: loss, correct, count."""
    logits = model.apply({"params": state["params"], "batch_stats": state["batch_stats"]},
                         batch["image"], train=False)
    mask = batch["mask"]
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
            "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}


def jit_steps(model, transforms, schedule, config, shardings: Shardings, state,
              binary_mask, train_view, eval_view):
    """(train_step, eval_step) jitted with explicit shardings; the state is donated.
    `binary_mask` (`bits.binary_mask`: the 1-bit parameters; None: none) adds the flip
    ratio. `train_view` / `eval_view` (`loop.device_views`) turn the pipeline's uint8 batch
    into the network's input inside the same program. `config.optimizer.clip_latent` clips
    the 1-bit layers' latent weights after each update (`clip_latent`).
    `config.train.bn_statistics` (`BN_STATISTICS`): per_device runs `train_step` per device
    under `jax.shard_map`."""
    clip_mask = binary_mask if config.optimizer.get("clip_latent", False) else None
    state_sharding = jax.tree.map(lambda _: shardings.replicated, state)
    per_device = bn_statistics(config.train) == "per_device"
    step_fn = functools.partial(
        train_step, model=model, transforms=transforms, schedule=schedule, seed=config.seed,
        binary_mask=binary_mask, clip_mask=clip_mask, axis_name="data" if per_device else None)
    if per_device:  # the state replicated in and out, the batch split on `data`; not
        # checked for replication (`check_vma`): the CPU kernels' custom VJPs do not carry
        # the varying-axes types, and the step makes its outputs equal by its one pmean
        step_fn = jax.shard_map(step_fn, mesh=shardings.mesh, in_specs=(P(), P("data")),
                                out_specs=(P(), P()), check_vma=False)

    def train(s, b):  # named: a profile (`train.profile_steps`) shows "train" per step
        return step_fn(s, train_view(b))

    train = jax.jit(
        train, in_shardings=(state_sharding, shardings.batch),
        out_shardings=(state_sharding, shardings.replicated), donate_argnums=(0,))
    evaluate = jax.jit(lambda s, b: eval_step(s, eval_view(b), model=model),
                       in_shardings=(state_sharding, shardings.batch),
                       out_shardings=shardings.replicated)
    return train, evaluate
