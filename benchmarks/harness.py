"""Shared pieces of the benchmarks (the drivers bench_step.py, compare.py, bench_compile.py,
bench_stacks.py and bench_optimizer.py; the workers jax_step.py and torch_step.py): the
benchmarked models, timing and peak memory inside a worker process, running workers in
their own processes alternately (A B A B ...) with the median over rounds, and the JSON and
tables the drivers write. Imports neither JAX nor torch, so each worker process loads only
the framework it measures."""

from __future__ import annotations

import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")

# name -> config file, its argument, global batch, image size, classes
MODELS = {
    "cliquenet_k36_T12": {"config": "cliquenet_cifar10", "arg": None, "batch": 64,
                          "image_size": 32, "num_classes": 10},
    "mbclique_cifar10": {"config": "mbclique_cifar10", "arg": None, "batch": 128,
                         "image_size": 32, "num_classes": 10},
    "cliquenet_s0": {"config": "cliquenet_imagenet", "arg": "S0", "batch": 8,
                     "image_size": 224, "num_classes": 1000},
}
DEFAULT_BUDGET_S = 300.0  # per process: the lax-loop form and PyTorch's bfloat16 modes take
# minutes per step on this 2-core CPU; without a limit one round would take hours
ENV_PREFIXES = ("XLA_FLAGS", "MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "JAX_", "OMP_", "MKL_",
                "KMP_")


def model_config(name: str):
    """The config file of benchmark model `name`, unchanged (imported only when called)."""
    spec = MODELS[name]
    return importlib.import_module(f"configs.{spec['config']}").get_config(spec["arg"])


# ----------------------------------------------------------------------------- in a worker


def _status_mb(field: str) -> float | None:
    """A `/proc/self/status` memory field (kB there) in MB, or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (VmHWM; ru_maxrss as a fallback)."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float | None:
    return _status_mb("VmRSS")


def time_steps(run_step: Callable[[], None], warmup: int, steps: int,
               budget_s: float = 0.0) -> list[float]:
    """Seconds of each of `steps` calls of `run_step` (which must finish the step before it
    returns) after `warmup` untimed calls. With `budget_s` > 0, once the warm-up and timed
    calls together have taken that long, the rest are skipped (at least one is timed): a
    form that takes minutes per step is still measured in bounded time."""
    started = time.perf_counter()
    over = lambda: budget_s > 0 and time.perf_counter() - started >= budget_s
    for _ in range(warmup):
        run_step()
        if over():
            break
    seconds = []
    for _ in range(steps):
        step_started = time.perf_counter()
        run_step()
        seconds.append(time.perf_counter() - step_started)
        if over():
            break
    return seconds


def step_result(seconds: list[float], batch: int, **extra) -> dict:
    """The JSON a worker prints: per-step times, their median, images/s, peak RSS."""
    median = statistics.median(seconds)
    return {"batch": batch, "steps": len(seconds), "step_seconds": seconds,
            "median_step_s": median, "images_per_s": batch / median,
            "peak_rss_mb": peak_rss_mb(), **extra}


def emit(result: dict) -> None:
    """Prints the worker's result as the last line of its standard output."""
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the driver


def run_worker(argv: list[str], timeout: float | None = None,
               python: str = sys.executable) -> dict:
    """Runs `python argv...` and returns the JSON object on its last output line, or
    {"error": ...} if it failed (its standard error is passed through)."""
    command = [python, *argv]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-5:]
        sys.stderr.write(done.stderr)
        return {"error": f"exit code {done.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def alternate(sides: dict[str, list[str]], repeats: int, timeout: float | None = None,
              log: Callable[[str], None] = print,
              pythons: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """Each side's worker once per round, rounds of all sides in turn: A B A B ...; a side
    named in `pythons` runs under that interpreter (another virtualenv), the rest under this
    one."""
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for round_index in range(repeats):
        for name, argv in sides.items():
            result = run_worker(argv, timeout, (pythons or {}).get(name, sys.executable))
            runs[name].append(result)
            shown = (f"{result['images_per_s']:.1f} img/s, peak {result['peak_rss_mb']:.0f} MB"
                     if "error" not in result else result["error"])
            log(f"round {round_index + 1}/{repeats} {name}: {shown}")
    return runs


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def combine(runs: list[dict]) -> dict:
    """Medians over the rounds of one side (rounds that failed are left out)."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[0]["error"] if runs else "not run", "rounds": 0}
    keys = ("images_per_s", "median_step_s", "init_s", "compile_s", "first_step_s", "peak_rss_mb")
    out = {key: _median([r.get(key) for r in good]) for key in keys}
    out["peak_rss_mb_max"] = max(r["peak_rss_mb"] for r in good)
    out["steps"] = min(r["steps"] for r in good)  # timed steps per round (fewest)
    out["rounds"] = len(good)
    return out


def environment() -> dict:
    """What else decides the speed: environment variables, CPUs, load, host."""
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    return {"python": sys.version.split()[0], "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(), "environment": env,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as out:
        json.dump(payload, out, indent=1)


def record(path: str, benchmark: str, args, summary: dict, runs: dict, **extra) -> dict:
    """Writes a driver's JSON (what was measured, its settings, medians, every round and the
    host) to `path` and returns it."""
    payload = {"benchmark": benchmark, **extra, "settings": vars(args), "summary": summary,
               "runs": runs, "host": environment()}
    write_json(path, payload)
    print(f"wrote {path}")
    return payload


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns right-aligned to their widest cell, the first left-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(
        str(cell).ljust(w) if i == 0 else str(cell).rjust(w)
        for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
    return "\n".join([line(header), "-" * len(line(header)), *map(line, rows)])


def add_step_args(parser) -> None:
    """The flags both sides' step workers take: shape overrides and timing."""
    parser.add_argument("--batch", type=int, default=0, help="0: the model's batch")
    parser.add_argument("--image_size", type=int, default=0, help="0: the model's size")
    parser.add_argument("--k", type=int, default=0)
    parser.add_argument("--T", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--budget_s", type=float, default=0.0,
                        help=">0: skip the remaining warm-up and timed steps once they "
                        "have taken this many seconds (at least one step is timed)")
