"""The optimizer update alone, per benchmark model: the project's per-parameter SGD
(`optim.make_optimizer`: `optax.chain(add_decayed_weights, sgd)`) against the flat form it
replaced on CPU (`optax.flatten(sgd)` after the decay: one momentum vector), each jitted as
in the training step (update, apply, keep the old state when not finite; state donated).
Prints the median time per update and the compiled kernels of each, so the trade-off is
visible: the flat form compiles about one kernel per parameter fewer, the per-parameter form
reads and writes each value fewer times (and keeps one state per parameter, which sharded
parameters need).

    python benchmarks/bench_optimizer.py [--models cliquenet_s0,...] [--rounds 3]
                                         [--iters 20] [--out runs/bench_optimizer.json]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cliquejax import platform  # noqa: E402

platform.configure_xla()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks import harness  # noqa: E402
from cliquejax.cpu.ops import global_norm  # noqa: E402
from cliquejax.models import build_model  # noqa: E402
from cliquejax.train import optim, step  # noqa: E402


def model_params(name: str):
    spec = harness.MODELS[name]
    config = harness.model_config(name)
    model = build_model(config, spec["num_classes"])
    images = jnp.zeros((1, spec["image_size"], spec["image_size"], 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shapes["params"])
    return config, params


def transforms(config) -> dict:
    opt = config.optimizer
    sgd = optax.sgd(opt.lr, momentum=opt.momentum, nesterov=bool(opt.nesterov))
    mask = lambda params: optim.weight_decay_mask(params, opt.weight_decay_on)
    flat = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=mask),
                       optax.flatten(sgd))
    return {"per parameter (ours)": optim.make_optimizer(config, 100)[0], "flat": flat}


def compiled_update(tx, params, grads):
    def update(params, opt_state, grads):
        updates, new_opt_state = tx.update(grads, opt_state, params)
        finite = jnp.isfinite(global_norm(grads))  # as train_step with the CPU kernels
        new = (optax.apply_updates(params, updates), new_opt_state)
        return step.keep_if(finite, new, (params, opt_state))
    state = jax.tree.map(jnp.copy, (params, tx.init(params)))
    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(*state, grads).compile()
    return compiled, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(harness.MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default="runs/bench_optimizer.json")
    args = parser.parse_args()
    rows, results = [], {}
    for name in args.models.split(","):
        config, params = model_params(name)
        grads = jax.tree.map(lambda p: p * 0.5 + 0.001, params)
        programs = {label: compiled_update(tx, params, grads)
                    for label, tx in transforms(config).items()}
        times = {label: [] for label in programs}
        for _ in range(args.rounds):  # interleaved: each variant once per round
            for label, (compiled, state) in programs.items():
                for _ in range(args.iters):
                    start = time.perf_counter()
                    state = compiled(*state, grads)
                    jax.block_until_ready(state)
                    times[label].append(time.perf_counter() - start)
                programs[label] = (compiled, state)
        size = sum(leaf.size for leaf in jax.tree.leaves(params))
        for label, (compiled, _) in programs.items():
            ms = 1000 * statistics.median(times[label])
            kernels = len(re.findall(r"= \S+ fusion\(", compiled.as_text()))
            results.setdefault(name, {})[label] = {"ms": ms, "kernels": kernels}
            rows.append([name, label, f"{size:,}", len(jax.tree.leaves(params)), f"{ms:.1f}",
                         kernels])
    print(harness.table(["model", "optimizer", "parameters", "leaves", "ms/update", "kernels"],
                        rows))
    harness.write_json(args.out, {"results": results, "environment": harness.environment()})


if __name__ == "__main__":
    main()
