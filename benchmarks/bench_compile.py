"""Compile time of the training step: cold (nothing cached) and warm (a second process that
finds the step in launch.py's compilation cache), for the CIFAR models and CliqueNet-S0.

For every model and round, a fresh cache directory: one `jax_step.py` worker compiles into
it (cold), a second worker with the same program loads from it (warm). compile_s is the
worker's `lower + compile` of the step (tracing included), init_s building the trainer (the
initial state is compiled there); the table gives medians.

    python benchmarks/bench_compile.py [--models cliquenet_k36_T12,mbclique_cifar10]
                                       [--repeats 1] [--out benchmarks/results/compile.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402

DEFAULT_MODELS = ("cliquenet_k36_T12", "mbclique_cifar10", "cliquenet_s0")


def one_round(model: str, timeout: float | None) -> dict:
    """{'cold': result, 'warm': result} of two workers sharing a fresh cache directory."""
    with tempfile.TemporaryDirectory() as cache:
        argv = [os.path.join("benchmarks", "jax_step.py"), f"--model={model}", "--warmup=0",
                "--steps=1", f"--compilation_cache={cache}"]
        cold = harness.run_worker(argv, timeout)
        warm = harness.run_worker(argv, timeout)
    return {"cold": cold, "warm": warm}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per process")
    parser.add_argument("--out", default="benchmarks/results/compile.json")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(harness.MODELS))
    if unknown:
        parser.error(f"--models: {','.join(unknown)}; allowed: {','.join(sorted(harness.MODELS))}")
    runs = {model: [] for model in models}
    for round_index in range(args.repeats):
        for model in models:
            result = one_round(model, args.timeout)
            runs[model].append(result)
            print(f"round {round_index + 1}/{args.repeats} {model}: cold "
                  f"{harness.fmt(result['cold'].get('compile_s'), '.1f')} s, warm "
                  f"{harness.fmt(result['warm'].get('compile_s'), '.1f')} s", file=sys.stderr)
    summary = {model: {kind: harness.combine([r[kind] for r in results])
                       for kind in ("cold", "warm")} for model, results in runs.items()}
    rows = [[model, *(harness.fmt(s[kind].get(field), ".1f") for field in ("init_s", "compile_s")
                      for kind in ("cold", "warm")),
             harness.fmt(s["cold"].get("first_step_s"), ".1f")] for model, s in summary.items()]
    print(f"training-step compile time, median of {args.repeats} round(s)")
    print(harness.table(["model", "init s cold", "init s cached", "step compile s cold",
                         "step compile s cached", "first step s"], rows))
    harness.record(args.out, "compile time, cold vs cached", args, summary, runs)
    return summary


if __name__ == "__main__":
    main()
