"""Measured training-step speed beside the roofline estimate, on whatever JAX runs on
(benchmarks/gpu_check.sh runs it the day a GPU is lent).

    python benchmarks/gpu_check.py [--models mbclique_cifar10,cliquenet_k36_T12]
        [--dtypes float32,bfloat16] [--steps 30] [--warmup 5] [--batch 0] [--target NAME]
        [--json runs/gpu_check.json]

For each model and compute dtype: the real jitted step of a run (benchmarks/jax_step.py's
`measure`: a `Trainer` on synthetic batches placed before timing), its median step time
and images/s; its MFU (the step's FLOPs, `cliquejax.lower`'s counter, over the step time
and the devices' dense peak in that dtype, `cliquejax.targets`); and the roofline estimate
(`cliquejax.hlo`) of the very program that ran, read from its optimized HLO, for the
target of this device kind (or --target). On a CPU there is no such target: --target=h100
then only exercises the code path (the CPU's program against an H100's figures is not an
estimate of anything).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import jax_step  # noqa: E402


def step_flops(config) -> int:
    """FLOPs (2 x MACs) of the whole train step for the global batch (`cliquejax.lower`)."""
    import jax

    from cliquejax import lower, summary

    backend = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    resolved = lower.for_platform(config, backend if backend in lower.PLATFORMS else "cuda")
    train, _, _ = lower.traced_steps(resolved)
    return 2 * int(sum(summary.jaxpr_macs(train.jaxpr.jaxpr).values()))


def check(model: str, dtype: str, args) -> dict:
    import jax

    from cliquejax import lower, targets

    namespace = argparse.Namespace(model=model, dtype=dtype, batch=args.batch, image_size=0,
                                   k=0, T=0, unroll=None, remat=None, kernels=None)
    config = jax_step.build_config(namespace)
    measured = jax_step.measure(config, args.warmup, args.steps, args.budget_s, keep_hlo=True)
    text = measured.pop("hlo_text")
    kind, devices = jax.devices()[0].device_kind, jax.device_count()
    target = targets.load()[args.target] if args.target else targets.for_device_kind(kind)
    flops = step_flops(config)
    row = {"model": model, "dtype": dtype, "device_kind": kind, "devices": devices,
           "backend": jax.default_backend(), "batch": measured["batch"],
           "images_per_second": measured["images_per_s"],
           "median_step_s": measured["median_step_s"], "steps": measured["steps"],
           "compile_s": measured["compile_s"], "flops": flops}
    peak = targets.peak_flops(kind, dtype)
    row["mfu"] = flops / measured["median_step_s"] / (devices * peak) if peak else None
    if target is not None:
        estimate = lower.report_from_hlo(text, target, devices, measured["batch"], flops,
                                         dtype)
        row.update(target=target["name"], roofline_step_s=estimate["roofline_step_seconds"],
                   roofline_images_per_second=estimate["images_per_second"],
                   roofline_mfu=estimate["mfu"], kernels=estimate["kernels"],
                   kernels_by_kind=estimate["kernels_by_kind"])
    return row


def _figure(value, format_spec: str) -> str:
    return "-" if value is None else format(value, format_spec)


def table(rows: list[dict]) -> str:
    lines = ["| model | dtype | device | batch | images/s | MFU | roofline images/s | "
             "roofline MFU | kernels |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['dtype']} | error: {row['error']} |")
            continue
        lines.append(
            f"| {row['model']} | {row['dtype']} | {row['devices']} x {row['device_kind']} | "
            f"{row['batch']} | {row['images_per_second']:,.0f} | {_figure(row['mfu'], '.1%')} | "
            f"{_figure(row.get('roofline_images_per_second'), ',.0f')} | "
            f"{_figure(row.get('roofline_mfu'), '.1%')} | {row.get('kernels', '-')} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mbclique_cifar10,cliquenet_k36_T12")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=0, help="0: the model's batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--budget_s", type=float, default=60.0)
    parser.add_argument("--target", default="", help="a cliquejax/targets name; default: "
                        "the one of this device kind")
    parser.add_argument("--json", default="runs/gpu_check.json")
    args = parser.parse_args(argv)

    from cliquejax import platform

    platform.restart_with_huge_pages()  # as launch.py
    platform.configure_xla()
    rows = []
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            try:
                rows.append(check(model, dtype, args))
            except Exception as error:  # noqa: BLE001 - one failed row, the others still run
                rows.append({"model": model, "dtype": dtype, "error": repr(error)[:200]})
            print(json.dumps(rows[-1]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump(rows, handle, indent=2)
    print(table(rows))
    if any("error" in row for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
