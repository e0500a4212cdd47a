"""Our training step against the PyTorch baseline, for one model, in one invocation.

Each side (ours: config.train.compute_dtype float32 / bfloat16 with the default
config.train.remat=layer, and float32 with remat=none; PyTorch: float32,
channels_last, bf16_autocast, bf16_channels_last) runs in its own process
(benchmarks/jax_step.py, benchmarks/torch_step.py), the sides alternating round by round
(A B C ... A B C ...) for --repeats rounds; each value is the median over rounds.
Our side runs as launch.py does (platform.configure_xla(); the environment is inherited
as it is), the real jitted step of `train.loop.Trainer` on synthetic data; PyTorch uses 2
threads, eager mode. Reported per side: images/s (from the median step time after
--warmup steps), the process's peak RSS, compile time (ours: lower + compile) and
first-step time, and achieved GFLOP/s = training FLOPs per image x images/s, where training
FLOPs = 3 x forward FLOPs (forward, and a backward pass of about twice the forward) and
forward FLOPs = 2 x the MACs counted by `cliquejax.summary` for one image; and the ratio of
each of our modes to each PyTorch mode (images/s). A process skips the rest of its warm-up
and timed steps once they have taken --budget_s seconds (at least one step is timed; the
"steps" column says how many were): PyTorch's bfloat16 modes take minutes per step on a CPU
without native bfloat16.

Models: cliquenet_k36_T12 (batch 64, 32x32; PyTorch: torch_reference.py), mbclique_cifar10
(configs/mbclique_cifar10.py, batch 128, 32x32; PyTorch: torch_models.py), cliquenet_s0
(CliqueNet-S0, batch 8, 224x224; PyTorch: torch_models.py). --batch, --image_size, --k, --T
override them (for quick trials). Without torch installed the PyTorch side is reported null.

    python benchmarks/compare.py --model=cliquenet_k36_T12 [--json] [--steps 10] [--warmup 2]
        [--repeats 3] [--budget_s SECONDS] [--our_modes float32,bfloat16,float32_no_remat]
        [--torch_modes float32,channels_last,bf16_autocast,bf16_channels_last]
        [--out benchmarks/results/compare_MODEL.json]

With --json the output ends with one line: {"model", "ours": {mode: images/s}, "torch":
{mode: images/s or null}, "ours_best", "torch_best" (images/s of the fastest mode),
"ours_peak_mb", "torch_peak_mb" (peak RSS of that fastest mode's process)}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402

OUR_MODES = ("float32", "bfloat16", "float32_no_remat")
OUR_MODE_FLAGS = {"float32": ["--dtype=float32"], "bfloat16": ["--dtype=bfloat16"],
                  "float32_no_remat": ["--dtype=float32", "--remat=none"]}
TORCH_MODES = ("float32", "channels_last", "bf16_autocast", "bf16_channels_last")  # as
# torch_reference.MODES (not imported here: this process loads neither framework)
SHORT = {"float32": "f32", "channels_last": "cl", "bf16_autocast": "bf16",
         "bf16_channels_last": "bf16 cl"}
TRAINING_FLOPS_PER_FORWARD = 3


def model_flags(args) -> list[str]:
    return [f"--model={args.model}", f"--batch={args.batch}", f"--image_size={args.image_size}",
            f"--k={args.k}", f"--T={args.T}"]


def label(side: str, mode: str) -> str:
    return f"{side} {mode}"


def make_sides(args, torch_available: bool) -> dict[str, list[str]]:
    """Worker command per side, keyed "ours MODE" / "torch MODE"."""
    timing = [f"--warmup={args.warmup}", f"--steps={args.steps}", f"--budget_s={args.budget_s}"]
    worker = lambda name: os.path.join(harness.BENCHMARKS, name)
    sides = {label("ours", mode): [worker("jax_step.py"), *OUR_MODE_FLAGS[mode],
                                   *model_flags(args), *timing]
             for mode in args.our_modes}
    for mode in args.torch_modes if torch_available else ():
        sides[label("torch", mode)] = [worker("torch_step.py"), f"--mode={mode}",
                                       *model_flags(args), *timing]
    return sides


def forward_flops(args) -> int | None:
    result = harness.run_worker([os.path.join(harness.BENCHMARKS, "jax_step.py"),
                                 *model_flags(args), "--flops_only"])
    return result.get("forward_flops_per_image")


def add_derived(summary: dict, flops: int | None) -> dict:
    """GFLOP/s per side and images/s ratios of each of our modes to each PyTorch mode."""
    for result in summary.values():
        ips = result.get("images_per_s")
        result["gflops_per_s"] = (TRAINING_FLOPS_PER_FORWARD * flops * ips / 1e9
                                  if ips and flops else None)
    ratios = {}
    for mode in OUR_MODES:
        ours = summary.get(label("ours", mode), {}).get("images_per_s")
        if ours is None:
            continue
        theirs = {m: summary.get(label("torch", m), {}).get("images_per_s") for m in TORCH_MODES}
        ratios[mode] = {m: ours / t if t else None for m, t in theirs.items()}
    return ratios


def print_table(summary: dict, ratios: dict, torch_note: str) -> None:
    header = ["side", "steps", "images/s", "step ms", "compile s", "first step s", "peak RSS MB",
              "GFLOP/s", *(f"x {SHORT[m]}" for m in TORCH_MODES)]
    rows = []
    for name, r in summary.items():
        side, mode = name.split(" ")
        if "error" in r:
            rows.append([name, *["-"] * (len(header) - 2), f"failed: {r['error'][:50]}"])
            continue
        step_ms = r["median_step_s"] * 1e3 if r.get("median_step_s") else None
        cells = [str(r["steps"]), harness.fmt(r["images_per_s"], ".1f"),
                 harness.fmt(step_ms, ".0f"), harness.fmt(r["compile_s"], ".1f"),
                 harness.fmt(r["first_step_s"], ".2f"), harness.fmt(r["peak_rss_mb"], ".0f"),
                 harness.fmt(r["gflops_per_s"], ".1f")]
        cells += [harness.fmt(ratios.get(mode, {}).get(m) if side == "ours" else None, ".2f")
                  for m in TORCH_MODES]
        rows.append([name, *cells])
    print(harness.table(header, rows))
    if torch_note:
        print(f"torch: {torch_note}")
    print(f"GFLOP/s: training FLOPs = {TRAINING_FLOPS_PER_FORWARD} x forward FLOPs per image "
          "(cliquejax.summary). x MODE: our images/s over PyTorch's in that mode ("
          + ", ".join(f"{short} = {mode}" for mode, short in SHORT.items()) + ")")


def best(summary: dict, side: str, modes) -> tuple[float | None, float | None]:
    """(images/s, peak RSS MB) of the fastest mode of `side`."""
    done = [summary[label(side, m)] for m in modes
            if summary.get(label(side, m), {}).get("images_per_s")]
    if not done:
        return None, None
    top = max(done, key=lambda r: r["images_per_s"])
    return top["images_per_s"], top["peak_rss_mb"]


def final_line(model: str, summary: dict) -> dict:
    ips = lambda side, modes: {m: summary.get(label(side, m), {}).get("images_per_s")
                               for m in modes}
    ours_best, ours_peak = best(summary, "ours", OUR_MODES)
    torch_best, torch_peak = best(summary, "torch", TORCH_MODES)
    return {"model": model, "ours": ips("ours", OUR_MODES), "torch": ips("torch", TORCH_MODES),
            "ours_best": ours_best, "torch_best": torch_best, "ours_peak_mb": ours_peak,
            "torch_peak_mb": torch_peak}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(harness.MODELS), default="cliquenet_k36_T12")
    parser.add_argument("--json", action="store_true", help="end with one JSON summary line")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all sides")
    parser.add_argument("--batch", type=int, default=0, help="0: the model's batch")
    parser.add_argument("--image_size", type=int, default=0, help="0: the model's size")
    parser.add_argument("--k", type=int, default=0, help="cliquenet_k36_T12 only; 0: 36")
    parser.add_argument("--T", type=int, default=0, help="cliquenet_k36_T12 only; 0: 12")
    parser.add_argument("--budget_s", type=float, default=harness.DEFAULT_BUDGET_S,
                        help="a process skips the remaining warm-up and timed steps once they "
                        "have taken this many seconds (at least one step is timed); 0: no limit")
    parser.add_argument("--our_modes", default=",".join(OUR_MODES))
    parser.add_argument("--torch_modes", default=",".join(TORCH_MODES))
    parser.add_argument("--timeout", type=float, default=None, help="seconds per process")
    parser.add_argument("--out", default="", help="JSON results path; default "
                        "benchmarks/results/compare_MODEL.json")
    args = parser.parse_args(argv)
    args.our_modes = [m for m in args.our_modes.split(",") if m]
    args.torch_modes = [m for m in args.torch_modes.split(",") if m]
    for given, allowed, name in ((args.our_modes, OUR_MODES, "--our_modes"),
                                 (args.torch_modes, TORCH_MODES, "--torch_modes")):
        if set(given) - set(allowed):
            parser.error(f"{name}={','.join(given)}; allowed: {','.join(allowed)}")
    args.out = args.out or f"benchmarks/results/compare_{args.model}.json"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch_available = importlib.util.find_spec("torch") is not None
    torch_note = "" if torch_available else "not installed (pip install -r " \
        "requirements-bench.txt); reported as null"
    log = lambda line: print(line, file=sys.stderr, flush=True)
    flops = forward_flops(args)
    runs = harness.alternate(make_sides(args, torch_available), args.repeats, args.timeout, log)
    summary = {side: harness.combine(results) for side, results in runs.items()}
    ratios = add_derived(summary, flops)
    print(f"{args.model}: median of {args.repeats} rounds, each {args.steps} steps after "
          f"{args.warmup}; forward {harness.fmt(flops and flops / 1e9, '.3f')} GFLOP/image")
    print_table(summary, ratios, torch_note)
    line = final_line(args.model, summary)
    payload = {"benchmark": "training step, ours vs PyTorch", "model": args.model,
               "settings": vars(args), "forward_flops_per_image": flops,
               "training_flops_per_image": flops and TRAINING_FLOPS_PER_FORWARD * flops,
               "torch_available": torch_available,
               "summary": summary, "ratios_ours_over_torch": ratios, "runs": runs,
               "result": line, "host": harness.environment()}
    harness.write_json(args.out, payload)
    print(f"wrote {args.out}")
    if args.json:
        print(json.dumps(line), flush=True)
    return payload


if __name__ == "__main__":
    main()
