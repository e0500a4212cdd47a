"""Runs a few training steps of a tiny model on every visible device and saves the losses
and final parameters: `python sharded_steps.py MODEL OUT.npz STEPS [KERNELS [BN]]` (KERNELS:
`config.train.kernels`, default auto; BN: `config.train.bn_statistics`, default global).
The 1-device vs 8-device test runs it twice with different XLA_FLAGS. With BN=per_device
it also saves `reference/...`: the same steps computed by hand, shard by shard, on one
device (each shard's loss, gradients and BN statistics, then their mean)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from cliquejax import platform  # noqa: E402

platform.configure_xla()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cliquejax import data  # noqa: E402
from cliquejax.kernels import resolve  # noqa: E402
from cliquejax.train import loop, step  # noqa: E402
from tests.conftest import tiny_digits_config  # noqa: E402


def config_for(model: str, kernels: str = "auto", bn: str = "global"):
    # per_device: 8 examples per device, so that each device's BN statistics are not those
    # of 2 examples (whose normalised values are +-1: a step ill-conditioned in float32)
    batch_size = 64 if bn == "per_device" else 16
    config = tiny_digits_config(batch_size=batch_size, kernels=kernels, bn_statistics=bn)
    # A small step: at lr 0.1 and batch 16 the first steps are chaotic enough to blow the
    # devices' float32 reduction-order differences (~1e-7) up past 1e-5 by step 3.
    config.optimizer.lr = 0.01
    if model == "cliquenet":
        from configs import cliquenet_cifar10

        clique = cliquenet_cifar10.get_config()
        clique.model.update(dict(k=4, T=6, bn_momentum=0.9))
        config.model = clique.model
    return config


def per_shard_reference(trainer, state, local_batches):
    """The steps of `train.bn_statistics=per_device`, by hand on one device: per update,
    each shard's loss and gradients (its own BN statistics) through the unsharded
    `train_step` (whose `train_view` is the trainer's), then their means, then the
    optimizer; the new running statistics are the shards' mean."""
    import jax.numpy as jnp

    config, shards, info = trainer.config, jax.device_count(), trainer.info
    train_view, _ = loop.device_views(config, info.image_shape, info.mean, info.std)
    binary_mask = loop.build_model_and_transforms(config, info.image_shape, info.num_classes,
                                                  trainer.steps_per_epoch)[3]
    losses = []
    for local in local_batches:
        batch = train_view({key: jnp.asarray(value) for key, value in local.items()})
        rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), state["step"])
        params, opt_states = state["params"], []
        for idx, tx in enumerate(trainer.transforms):
            outs = []
            for shard in range(shards):
                part = {key: jnp.split(value, shards)[shard] for key, value in batch.items()}
                loss = step._loss_fn(trainer.model, state, part, jax.random.fold_in(rng, shard))
                outs.append(jax.value_and_grad(loss, has_aux=True)(params))
            mean = lambda tree: jax.tree.map(lambda *xs: sum(xs) / shards, *tree)
            (ce, (_, stats)), grads = mean(outs)
            if idx == 0:
                losses.append(float(ce))
                batch_stats = stats
            updates, opt_state = tx.update(grads, state["opt_state"][idx], params)
            params = step.optax.apply_updates(params, updates)
            if config.optimizer.get("clip_latent", False):
                params = step.clip_latent(params, binary_mask)
            opt_states.append(opt_state)
        state = {"step": state["step"] + 1, "params": params, "batch_stats": batch_stats,
                 "opt_state": tuple(opt_states)}
    return losses, state


def saved(state) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(
        {"params": state["params"], "batch_stats": state["batch_stats"]}))
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def main(model: str, out: str, steps: int = 4, kernels: str = "auto",
         bn: str = "global") -> None:
    config = config_for(model, kernels, bn)
    trainer = loop.Trainer(config, os.path.dirname(out))
    assert trainer.model.ops.name == resolve(config)
    batches = data.make_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                       seed=config.seed)
    first = jax.device_get(trainer.state)  # before the steps donate it
    losses, local_batches = [], []
    for _ in range(steps):
        local_batches.append(next(batches))
        batch = step.global_batch(local_batches[-1], trainer.shardings)
        trainer.state, metrics = trainer.train_step(trainer.state, batch)
        losses.append(float(metrics["loss"]))
    arrays = saved(trainer.state)
    if bn == "per_device":
        ref_losses, ref_state = per_shard_reference(trainer, first, local_batches)
        arrays.update({f"reference/{key}": value for key, value in saved(ref_state).items()})
        arrays["reference/losses"] = np.array(ref_losses)
    np.savez(out, losses=np.array(losses), devices=jax.device_count(), **arrays)
    trainer.checkpoints.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:6])
