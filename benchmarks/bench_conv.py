"""Convolution speed on CPU: XLA's convolution (float32, bfloat16) against
`conv.conv2d_matmul` (bfloat16 matrix products), forward + backward, for the shapes of
CliqueNet (k=36, T=12, batch 64) and MBCliqueNet (CIFAR-10, batch 128); with --model also a
whole CliqueNet training step (value_and_grad) in float32 and in bfloat16.

Each variant is one jitted program running --iters forward + backward passes on different
inputs, so that XLA's temporary buffer is reused as inside a training step. The variants run
interleaved for --rounds rounds (each called twice per round, the second call timed: the
first call after another program pays extra page faults); the table gives the median time
per pass, GFLOP/s (3 x 2*N*H*W*Cin*Cout*k*k per pass) and the speed-up over XLA float32.

    python benchmarks/bench_conv.py [--rounds 5] [--iters 3] [--model] [--only clique]
                                    [--out runs/bench_conv.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cliquejax import platform  # noqa: E402

platform.configure_xla()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cliquejax.cpu import conv  # noqa: E402

SHAPES = (  # name, batch, height = width, cin, cout, kernel
    ("clique stem 3x3 3->64", 64, 32, 3, 64, 3),
    ("clique b1 3x3 64->36", 64, 32, 64, 36, 3),
    ("clique b1 3x3 108->36", 64, 32, 108, 36, 3),
    ("clique b1 3x3 172->36", 64, 32, 172, 36, 3),
    ("clique b2 3x3 252->36", 64, 16, 252, 36, 3),
    ("clique b3 3x3 288->36", 64, 8, 288, 36, 3),
    ("clique transition 1x1 144->144", 64, 32, 144, 144, 1),
    ("mb b1 1x1 256->64", 128, 32, 256, 64, 1),
    ("mb b2 1x1 512->128", 128, 16, 512, 128, 1),
    ("mb b3 1x1 1280->256", 128, 8, 1280, 256, 1),
    ("mb b1 3x3 64->64", 128, 32, 64, 64, 3),
    ("mb b2 3x3 128->128", 128, 16, 128, 128, 3),
    ("mb b3 3x3 256->256", 128, 8, 256, 256, 3),
)
BF16, F32 = jnp.bfloat16, jnp.float32


def xla_conv(x, kernel, dtype):
    return jax.lax.conv_general_dilated(
        x.astype(dtype), kernel.astype(dtype), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def matmul_conv(x, kernel, dtype):
    return conv.conv2d_matmul(x, kernel, "SAME", dtype)


def compile_passes(conv_fn, dtype, xs, kernel, cotangents, forward_patches=None):
    """A compiled program of len(xs) forward + backward passes, one per input, returning
    every output and both gradients (reduced results would let XLA rewrite the passes)."""
    def one(x, kernel, cotangent):
        y, pullback = jax.vjp(lambda a, b: conv_fn(a, b, dtype), x, kernel)
        return (y, *pullback(cotangent.astype(y.dtype)))

    program = jax.jit(lambda xs, kernel, cts: [
        one(x, kernel, ct) for x, ct in zip(xs, cts, strict=True)])
    rule = conv.FORWARD_PATCHES
    if forward_patches is not None:  # the other forward formulation, for comparison
        conv.FORWARD_PATCHES = lambda cin, cout: forward_patches
    try:
        return program.lower(xs, kernel, cotangents).compile()
    finally:
        conv.FORWARD_PATCHES = rule


def variants(cin, cout, k):
    out = {"xla_f32": (xla_conv, F32, None), "xla_bf16": (xla_conv, BF16, None),
           "matmul_bf16": (matmul_conv, BF16, None)}
    if k > 1:
        patches = not conv.FORWARD_PATCHES(cin, cout)
        out["matmul_bf16_" + ("patches" if patches else "taps")] = (matmul_conv, BF16, patches)
    return out


def interleaved(programs: dict, rounds: int, scale: float = 1.0) -> dict:
    """Median seconds (times `scale`) of each zero-argument callable, run interleaved."""
    times = {name: [] for name in programs}
    for _ in range(rounds):
        for name, run in programs.items():
            jax.block_until_ready(run())
            started = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append((time.perf_counter() - started) * scale)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_shape(shape, rounds: int, iters: int) -> dict:
    name, n, hw, cin, cout, k = shape
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout), np.float32) / np.sqrt(k * k * cin))
    x32 = [jnp.asarray(rng.standard_normal((n, hw, hw, cin), np.float32)) for _ in range(iters)]
    ct = [jnp.asarray(rng.standard_normal((n, hw, hw, cout), np.float32)) for _ in range(iters)]
    programs = {}
    for label, (fn, dtype, patches) in variants(cin, cout, k).items():
        xs = [x.astype(dtype) for x in x32]
        compiled = compile_passes(fn, dtype, xs, kernel, ct, patches)
        programs[label] = lambda c=compiled, xs=xs: c(xs, kernel, ct)
    seconds = interleaved(programs, rounds, 1.0 / iters)
    flops = 3 * 2 * n * hw * hw * cin * cout * k * k
    base = seconds["xla_f32"]
    return {"name": name, "shape": [n, hw, hw, cin, cout, k],
            "ms": {v: s * 1e3 for v, s in seconds.items()},
            "gflops": {v: flops / s / 1e9 for v, s in seconds.items()},
            "speedup_vs_xla_f32": {v: base / s for v, s in seconds.items()}}


def print_row(row):
    cells = "  ".join(f"{v} {row['ms'][v]:7.1f} ms {row['gflops'][v]:4.0f} GF/s "
                      f"x{row['speedup_vs_xla_f32'][v]:.2f}" for v in row["ms"])
    print(f"{row['name']:32s} {cells}", flush=True)


def model_step(dtype: str, batch: int):
    """(compiled value_and_grad step, its arguments, logits function) of CliqueNet k36 T12."""
    from cliquejax.models import build_model
    from configs import cliquenet_cifar10

    config = cliquenet_cifar10.get_config()
    config.train.compute_dtype = dtype
    model = build_model(config, 10)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch, 32, 32, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, 10, batch))
    variables = model.init(jax.random.PRNGKey(0), images[:1], train=False)

    def logits_fn(params):
        return model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                           train=True, rngs={"dropout": jax.random.PRNGKey(1)},
                           mutable=["batch_stats"])

    def loss(params):
        logits, new_vars = logits_fn(params)
        logp = jax.nn.log_softmax(logits.astype(F32))
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1)), new_vars

    step = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(variables["params"]).compile()
    return step, variables["params"], jax.jit(lambda p: logits_fn(p)[0])


def bench_model(rounds: int, batch: int) -> dict:
    steps, logits = {}, {}
    for dtype in ("float32", "bfloat16"):
        step, params, logits_fn = model_step(dtype, batch)
        steps[dtype] = lambda s=step, p=params: s(p)
        logits[dtype] = np.asarray(logits_fn(params), np.float32)
    seconds = interleaved(steps, rounds)
    error = np.linalg.norm(logits["bfloat16"] - logits["float32"]) / np.linalg.norm(
        logits["float32"])
    return {"model": "cliquenet k=36 T=12 (configs/cliquenet_cifar10.py)", "batch": batch,
            "ms_per_step": {d: s * 1e3 for d, s in seconds.items()},
            "images_per_s": {d: batch / s for d, s in seconds.items()},
            "speedup_bf16": seconds["float32"] / seconds["bfloat16"],
            "logits_relative_error_bf16": float(error)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3, help="passes per timed program")
    parser.add_argument("--only", default="", help="run the shapes whose name contains this")
    parser.add_argument("--model", action="store_true", help="also time a CliqueNet step")
    parser.add_argument("--model-rounds", type=int, default=5)
    parser.add_argument("--out", default="runs/bench_conv.json")
    args = parser.parse_args()
    result = {"jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "ld_preload": os.environ.get("LD_PRELOAD", ""),
              "malloc_conf": os.environ.get("MALLOC_CONF", ""),
              "cpu_count": os.cpu_count(), "machine": host.machine(),
              "load_average_start": os.getloadavg(), "convs": []}
    for shape in SHAPES:
        if args.only in shape[0]:
            result["convs"].append(bench_shape(shape, args.rounds, args.iters))
            print_row(result["convs"][-1])
    if args.model:
        result["model_step"] = bench_model(args.model_rounds, 64)
        print(json.dumps(result["model_step"], indent=1), flush=True)
    result["load_average_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
