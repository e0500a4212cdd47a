"""Runs a few training steps of a tiny model on every visible device and saves the losses
and final parameters: `python sharded_steps.py MODEL OUT.npz STEPS [KERNELS]` (KERNELS:
`config.train.kernels`, default auto). The 1-device vs 8-device test runs it twice with
different XLA_FLAGS."""

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


def config_for(model: str, kernels: str = "auto"):
    config = tiny_digits_config(batch_size=16, kernels=kernels)
    # A small step: at lr 0.1 and batch 16 the first steps are chaotic enough to blow the
    # devices' float32 reduction-order differences (~1e-7) up past 1e-5 by step 3.
    config.optimizer.lr = 0.01
    if model == "cliquenet":
        from configs import cliquenet_cifar10

        clique = cliquenet_cifar10.get_config()
        clique.model.update(dict(k=4, T=6, bn_momentum=0.9))
        config.model = clique.model
    return config


def main(model: str, out: str, steps: int = 4, kernels: str = "auto") -> None:
    config = config_for(model, kernels)
    trainer = loop.Trainer(config, os.path.dirname(out))
    assert trainer.model.ops.name == resolve(config)
    batches = data.make_train_iterator(config.data, global_batch_size=16, seed=config.seed)
    losses = []
    for _ in range(steps):
        batch = step.global_batch(next(batches), trainer.shardings)
        trainer.state, metrics = trainer.train_step(trainer.state, batch)
        losses.append(float(metrics["loss"]))
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(
        {"params": trainer.state["params"], "batch_stats": trainer.state["batch_stats"]}))
    arrays = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}
    np.savez(out, losses=np.array(losses), devices=jax.device_count(), **arrays)
    trainer.checkpoints.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
