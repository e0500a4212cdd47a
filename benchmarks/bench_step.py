"""Training-step speed of CliqueNet in its two clique-block forms: the lax-loop form
(`config.model.unroll=False`, `jax.lax.fori_loop` over the layers) against the unrolled form
(`unroll=True`, the default).

For CliqueNet k=36 T=12 (configs/cliquenet_cifar10.py) at batch 64 on 32x32 synthetic
inputs, each form runs in its own process (benchmarks/jax_step.py: the real jitted,
sharded, donating step of `train.loop.Trainer`, XLA flags as launch.py sets them), the forms
alternating loop, unrolled, loop, unrolled ... for --repeats rounds. Per form: compile time
(lower + compile of the step), first-step time, median step time over --steps steps after
--warmup steps and images/s from it, and the process's peak RSS (VmHWM); the table gives
the median over rounds (peak RSS: median, and the maximum in the JSON). A process skips the
rest of its warm-up and timed steps once they have taken --budget_s seconds (at least one
step is timed; the "steps" column says how many were): the lax-loop form can take minutes
per step on a 2-core CPU.

    python benchmarks/bench_step.py [--steps 20] [--warmup 3] [--repeats 3] [--batch 64]
        [--k 36] [--T 12] [--dtype float32] [--budget_s 300] [--timeout SECONDS]
        [--json benchmarks/results/bench_step.json]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402

FORMS = {"loop": 0, "unrolled": 1}  # name -> config.model.unroll
MODEL = "cliquenet_k36_T12"


def worker_argv(args, unroll: int) -> list[str]:
    return [os.path.join(harness.BENCHMARKS, "jax_step.py"), f"--model={MODEL}",
            f"--unroll={unroll}", f"--dtype={args.dtype}", f"--batch={args.batch}",
            f"--k={args.k}", f"--T={args.T}", f"--warmup={args.warmup}", f"--steps={args.steps}",
            f"--budget_s={args.budget_s}"]


def print_table(summary: dict) -> None:
    header = ["form", "steps", "compile s", "first step s", "step ms", "images/s", "peak RSS MB",
              "rounds"]
    rows = []
    for form, r in summary.items():
        if "error" in r:
            rows.append([form, "-", "-", "-", "-", "-", "-", f"0 ({r['error'][:60]})"])
            continue
        rows.append([form, str(r["steps"]), harness.fmt(r["compile_s"], ".1f"),
                     harness.fmt(r["first_step_s"], ".2f"),
                     harness.fmt(r["median_step_s"] * 1e3, ".0f"),
                     harness.fmt(r["images_per_s"], ".1f"), harness.fmt(r["peak_rss_mb"], ".0f"),
                     str(r["rounds"])])
    print(harness.table(header, rows))
    loop, unrolled = summary.get("loop", {}), summary.get("unrolled", {})
    if loop.get("images_per_s") and unrolled.get("images_per_s"):
        print(f"unrolled / loop: {unrolled['images_per_s'] / loop['images_per_s']:.2f}x "
              f"images/s, {unrolled['compile_s'] / loop['compile_s']:.2f}x compile time")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of loop, unrolled")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=36)
    parser.add_argument("--T", type=int, default=12)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="config.train.compute_dtype")
    parser.add_argument("--budget_s", type=float, default=harness.DEFAULT_BUDGET_S,
                        help="a process skips the remaining warm-up and timed steps once they "
                        "have taken this many seconds (at least one step is timed); 0: no limit")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per process")
    parser.add_argument("--json", default="benchmarks/results/bench_step.json",
                        help="where to write the results")
    args = parser.parse_args(argv)

    sides = {form: worker_argv(args, unroll) for form, unroll in FORMS.items()}
    runs = harness.alternate(sides, args.repeats, args.timeout,
                             log=lambda line: print(line, file=sys.stderr, flush=True))
    summary = {form: harness.combine(results) for form, results in runs.items()}
    print(f"CliqueNet k={args.k} T={args.T}, batch {args.batch}, 32x32, {args.dtype}: "
          f"median of {args.repeats} rounds, each {args.steps} steps after {args.warmup}")
    print_table(summary)
    return harness.record(args.json, "training step, lax-loop vs unrolled clique blocks", args,
                          summary, runs, model=MODEL)


if __name__ == "__main__":
    main()
