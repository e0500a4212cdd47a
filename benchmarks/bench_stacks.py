"""Training-step speed and peak memory of the same code under two Python/JAX stacks: the
current lock (`.venv`, requirements.txt) against the oldest supported one (`.venv-oldest`,
requirements-oldest.txt), each with the XLA:CPU flags `platform.configure_xla` chooses for
its jaxlib. For each benchmark model (benchmarks/harness.py: CliqueNet k=36 T=12,
MBCliqueNet CIFAR-10, CliqueNet-S0) the two stacks' `jax_step.py` workers alternate, one
process each, old new old new ... for --repeats rounds; the table gives medians.

    python benchmarks/bench_stacks.py [--old .venv-oldest/bin/python] [--new .venv/bin/python]
        [--models cliquenet_k36_T12,mbclique_cifar10,cliquenet_s0] [--repeats 2] [--steps 3]
        [--warmup 1] [--json benchmarks/results/bench_stacks.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402

VERSIONS = ("import sys, jax, jaxlib; "
            "print(sys.version.split()[0], jax.__version__, jaxlib.__version__)")


def stack_name(python: str) -> str:
    """'Python X.Y.Z, jax A, jaxlib B' of an interpreter."""
    done = subprocess.run([python, "-c", VERSIONS], capture_output=True, text=True, check=True)
    py, jax_version, jaxlib_version = done.stdout.split()
    return f"Python {py}, jax {jax_version}, jaxlib {jaxlib_version}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default=".venv-oldest/bin/python")
    parser.add_argument("--new", default=".venv/bin/python")
    parser.add_argument("--models", default="cliquenet_k36_T12,mbclique_cifar10,cliquenet_s0")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per process")
    parser.add_argument("--json", default="benchmarks/results/bench_stacks.json")
    args = parser.parse_args(argv)

    stacks = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    names = {side: stack_name(python) for side, python in stacks.items()}
    summary, runs = {}, {}
    for model in args.models.split(","):
        worker = [os.path.join(harness.BENCHMARKS, "jax_step.py"), f"--model={model}",
                  f"--warmup={args.warmup}", f"--steps={args.steps}"]
        sides = {f"{model} {side}": worker for side in stacks}
        pythons = {f"{model} {side}": python for side, python in stacks.items()}
        result = harness.alternate(sides, args.repeats, args.timeout, pythons=pythons,
                                   log=lambda line: print(line, file=sys.stderr, flush=True))
        runs.update(result)
        summary.update({name: harness.combine(r) for name, r in result.items()})

    for side, name in names.items():
        print(f"{side}: {name}")
    header = ["model", "stack", "step s", "images/s", "peak RSS MB", "compile s", "new / old"]
    rows = []
    for model in args.models.split(","):
        old, new = summary[f"{model} old"], summary[f"{model} new"]
        for side, r in (("old", old), ("new", new)):
            ratio = "-"
            if side == "new" and old.get("images_per_s") and new.get("images_per_s"):
                ratio = f"{new['images_per_s'] / old['images_per_s']:.2f}x img/s, " \
                        f"{new['peak_rss_mb'] / old['peak_rss_mb']:.2f}x RSS"
            rows.append([model, side, harness.fmt(r.get("median_step_s"), ".2f"),
                         harness.fmt(r.get("images_per_s"), ".1f"),
                         harness.fmt(r.get("peak_rss_mb"), ".0f"),
                         harness.fmt(r.get("compile_s"), ".1f"), ratio])
    print(harness.table(header, rows))
    return harness.record(args.json, "training step under two stacks", args, summary, runs,
                          stacks=names)


if __name__ == "__main__":
    main()
