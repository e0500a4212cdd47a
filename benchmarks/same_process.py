"""Two commits' training steps timed in ONE process, alternating: no process-to-process
variance (memory layout, huge pages, the machine's load between processes) in the ratio.

`export`, run in a checkout of each commit (a git worktree; its code must come first on
sys.path, hence `PYTHONPATH=.`), builds the step as benchmarks/jax_step.py does (the
`train.loop.Trainer` of the model's config on synthetic batches, under launch.py's XLA
flags), serializes the jitted step with `jax.export` (state and batch as flat lists of
arrays) and saves its initial state and two batches. `time` loads any number of such files
into one process under this checkout's XLA flags, compiles each, runs two untimed steps of
each, then --rounds rounds of --steps steps per side, the order of the sides reversed every
other round, and prints one JSON line per side: median, mean and min seconds per step over
the rounds, and images/s from the median.

    cd WORKTREE_BEFORE && PYTHONPATH=. python /path/to/benchmarks/same_process.py export \\
        --model=mbclique_cifar10 --out=/tmp/before
    cd WORKTREE_AFTER && PYTHONPATH=. python benchmarks/same_process.py export \\
        --model=mbclique_cifar10 --out=/tmp/after [--kernels=auto]
    python benchmarks/same_process.py time /tmp/before /tmp/after [--rounds 8] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())  # `export`: the checkout being measured, not this file's


def configure() -> None:
    from cliquejax import platform

    platform.restart_with_huge_pages()  # as launch.py
    platform.configure_xla()


def export(args) -> None:
    """Written out rather than shared with jax_step.measure: it must run against older
    checkouts, whose jax_step has only `build_config` in common with this one."""
    import jax

    from benchmarks import jax_step
    from cliquejax import data
    from cliquejax.train import loop, step

    options = argparse.Namespace(model=args.model, batch=None, image_size=None, k=None,
                                 T=None, unroll=None, dtype=args.dtype, remat=None,
                                 kernels=args.kernels)
    config = jax_step.build_config(options)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = loop.Trainer(config, workdir)
        batches = data.make_train_iterator(config.data, global_batch_size=trainer.global_batch,
                                           seed=0)
        batches = [step.global_batch(next(batches), trainer.shardings) for _ in range(2)]
        state_tree, batch_tree = jax.tree.structure(trainer.state), jax.tree.structure(
            batches[0])

        def flat_step(state, batch):  # optax's state types have no export serialization
            new, metrics = trainer.train_step(jax.tree.unflatten(state_tree, state),
                                              jax.tree.unflatten(batch_tree, batch))
            return jax.tree.leaves(new), metrics

        exported = jax.export.export(jax.jit(flat_step, donate_argnums=0))(
            jax.tree.leaves(trainer.state), jax.tree.leaves(batches[0]))
        with open(args.out + ".jaxexport", "wb") as handle:
            handle.write(exported.serialize())
        with open(args.out + ".arrays.pkl", "wb") as handle:
            pickle.dump({"state": [jax.device_get(x) for x in jax.tree.leaves(trainer.state)],
                         "batches": [[jax.device_get(x) for x in jax.tree.leaves(b)]
                                     for b in batches],
                         "batch_size": trainer.global_batch}, handle)
        trainer.checkpoints.close()
    print(json.dumps({"exported": args.out, "model": args.model, "kernels": args.kernels}))


def time_sides(args) -> None:
    import jax
    import numpy as np

    sides = {}
    for name in args.sides:
        with open(name + ".jaxexport", "rb") as handle:
            exported = jax.export.deserialize(bytearray(handle.read()))
        with open(name + ".arrays.pkl", "rb") as handle:
            saved = pickle.load(handle)
        run = jax.jit(exported.call, donate_argnums=0)
        state = [jax.device_put(x) for x in saved["state"]]
        batches = [[jax.device_put(x) for x in b] for b in saved["batches"]]
        started = time.perf_counter()
        compiled = run.lower(state, batches[0]).compile()
        sides[name] = {"run": compiled, "state": state, "batches": batches, "calls": 0,
                       "seconds": [], "batch_size": saved["batch_size"],
                       "compile_s": time.perf_counter() - started}

    def one_step(side):
        side["state"], metrics = side["run"](side["state"], side["batches"][side["calls"] % 2])
        jax.block_until_ready((side["state"], metrics))
        side["calls"] += 1

    for side in sides.values():
        one_step(side)
        one_step(side)
    for round_index in range(args.rounds):
        for name in args.sides if round_index % 2 == 0 else args.sides[::-1]:
            side = sides[name]
            started = time.perf_counter()
            for _ in range(args.steps):
                one_step(side)
            side["seconds"].append((time.perf_counter() - started) / args.steps)
        print(f"round {round_index}: " + ", ".join(
            f"{name} {side['seconds'][-1]:.3f} s" for name, side in sides.items()),
            file=sys.stderr, flush=True)
    for name, side in sides.items():
        seconds = np.array(side["seconds"])
        print(json.dumps({"side": name, "median_s": float(np.median(seconds)),
                          "mean_s": float(seconds.mean()), "min_s": float(seconds.min()),
                          "images_per_s": side["batch_size"] / float(np.median(seconds)),
                          "rounds": args.rounds, "steps": args.steps,
                          "compile_s": round(side["compile_s"], 1)}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    exporting = commands.add_parser("export")
    exporting.add_argument("--model", required=True,
                           help="a model of benchmarks/harness.py MODELS")
    exporting.add_argument("--out", required=True, help="path prefix of the two files")
    exporting.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    exporting.add_argument("--kernels", choices=("auto", "reference", "cpu"), default=None,
                           help="config.train.kernels (commits before it: leave unset)")
    timing = commands.add_parser("time")
    timing.add_argument("sides", nargs="+", help="path prefixes written by export")
    timing.add_argument("--rounds", type=int, default=8)
    timing.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    configure()
    if args.command == "export":
        export(args)
    else:
        time_sides(args)


if __name__ == "__main__":
    main()
