"""Worker: times our jitted training step for one model and one setting, in this process,
and prints one JSON line (bench_step.py and compare.py start it, one process per side).

The step is the one `launch.py` trains with: XLA flags from `platform.configure_xla()`, a
`train.loop.Trainer` (state, optimizer, shardings, the jitted, donating `train_step`) on
`config.data.name = "synthetic"` batches of the configured size. A few batches are made
and placed before timing, so only the step is timed. compile_s is `lower + compile` of the
step, first_step_s the first call of the compiled step; then --warmup untimed and --steps
timed steps. init_s is building the `Trainer` (its initial state is compiled and computed
there). peak_rss_mb is the process's peak RSS (VmHWM) at the end.

    python benchmarks/jax_step.py --model=cliquenet_k36_T12 [--dtype=bfloat16] [--remat=layer]
                                                           [--unroll=0] [--kernels=reference]
    python benchmarks/jax_step.py --model=mbclique_cifar10 --flops_only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402

PLACED_BATCHES = 2  # distinct batches the timed steps cycle through


def build_config(args):
    """The model's config file with the benchmark's overrides and synthetic data."""
    spec = harness.MODELS[args.model]
    config = harness.model_config(args.model)
    batch = args.batch or spec["batch"]
    size = args.image_size or spec["image_size"]
    for field in ("k", "T"):
        if getattr(args, field):
            if field not in config.model:
                raise ValueError(f"--{field} applies to CliqueNet (CIFAR) only")
            config.model[field] = getattr(args, field)
    if args.unroll is not None:
        config.model.unroll = bool(args.unroll)
    config.train.compute_dtype = args.dtype
    if args.remat:
        config.train.remat = args.remat
    if getattr(args, "kernels", None):
        config.train.kernels = args.kernels
    config.train.batch_size = batch
    config.data.update(name="synthetic", image_size=size, num_classes=spec["num_classes"],
                       num_train=PLACED_BATCHES * batch, num_test=batch, flip=False,
                       crop_padding=0, worker_count="0")
    return config


def forward_flops(config) -> int:
    """FLOPs (2 x MACs) of one image's forward pass, from `cliquejax.summary`, counted on the
    unrolled float32 model: the loop form also convolves over zero padding, which is not
    useful work."""
    from cliquejax import summary

    config = config.copy_and_resolve_references()
    config.model.unroll = True
    config.train.compute_dtype = "float32"
    config.train.kernels = "reference"  # stock convolutions and products only
    return summary.counts(config)[1]


def measure(config, warmup: int, steps: int, budget_s: float = 0.0,
            keep_hlo: bool = False) -> dict:
    """The step's timings (module docstring); `keep_hlo`: with its optimized program's
    text as `hlo_text` (benchmarks/gpu_check.py reads its kernels)."""
    import jax

    from cliquejax import data
    from cliquejax.train import loop, step

    with tempfile.TemporaryDirectory() as workdir:
        started = time.perf_counter()
        trainer = loop.Trainer(config, workdir)  # builds and compiles the initial state
        init_s = time.perf_counter() - started
        batch_size = trainer.global_batch
        iterator = data.make_train_iterator(config.data, global_batch_size=batch_size, seed=0)
        batches = [step.global_batch(next(iterator), trainer.shardings)
                   for _ in range(PLACED_BATCHES)]
        rss_before = harness.rss_mb()
        started = time.perf_counter()
        compiled = trainer.train_step.lower(trainer.state, batches[0]).compile()
        compile_s = time.perf_counter() - started
        holder = {"state": trainer.state, "calls": 0}
        trainer.state = None  # donated to the step

        def run_step():
            batch = batches[holder["calls"] % PLACED_BATCHES]
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready((holder["state"], metrics))
            holder["calls"] += 1

        started = time.perf_counter()
        run_step()
        first_step_s = time.perf_counter() - started
        seconds = harness.time_steps(run_step, warmup, steps, budget_s)
        result = harness.step_result(
            seconds, batch_size, init_s=init_s, compile_s=compile_s, first_step_s=first_step_s,
            rss_before_compile_mb=rss_before, devices=jax.device_count(),
            jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""))
        if keep_hlo:
            result["hlo_text"] = compiled.as_text()
        trainer.checkpoints.close()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(harness.MODELS), required=True)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--remat", choices=("none", "layer", "layer_keep_1x1", "block"),
                        default=None, help="config.train.remat (default: the config's own)")
    parser.add_argument("--unroll", type=int, choices=(0, 1), default=None,
                        help="config.model.unroll (default: the config's own)")
    parser.add_argument("--kernels", choices=("auto", "reference", "cpu"), default=None,
                        help="config.train.kernels (default: the config's own, auto)")
    harness.add_step_args(parser)
    parser.add_argument("--compilation_cache", default="",
                        help="a directory as launch.py's --compilation_cache; '' (default): "
                        "none, compile_s is a cold compile")
    parser.add_argument("--flops_only", action="store_true",
                        help="print the forward FLOPs per image and exit")
    args = parser.parse_args(argv)

    from cliquejax import platform

    platform.restart_with_huge_pages()  # as launch.py
    platform.configure_xla()  # as launch.py, before JAX is imported
    platform.use_compilation_cache(args.compilation_cache)
    config = build_config(args)
    if args.flops_only:
        harness.emit({"model": args.model, "forward_flops_per_image": forward_flops(config)})
        return
    result = measure(config, args.warmup, args.steps, args.budget_s)
    from cliquejax import kernels

    harness.emit(dict(result, model=args.model, dtype=args.dtype,
                      unroll=bool(config.model.unroll), kernels=kernels.resolve(config)))


if __name__ == "__main__":
    main()
