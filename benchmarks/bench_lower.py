"""Time to trace, lower and compile the training step of CliqueNet in its two clique-block
forms, unrolled (`model.unroll=True`) and `jax.lax.fori_loop` (False): the step a run jits
(`lower.traced_steps`), lowered for --platforms; compiled where the platform is this
machine's (lowering for cuda or tpu needs no accelerator, compiling does). One process, one
measurement per form and platform, forms in the order given.

    python benchmarks/bench_lower.py [--k 80] [--T 18] [--platforms cpu,cuda]
        [--forms unrolled,loop]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=80)
    parser.add_argument("--T", type=int, default=18)
    parser.add_argument("--platforms", default="cpu,cuda")
    parser.add_argument("--forms", default="unrolled,loop")
    args = parser.parse_args()
    from cliquejax import platform

    platform.configure_xla()  # launch.py's XLA flags
    import jax

    from cliquejax import lower
    from configs import cliquenet_cifar10

    for form in args.forms.split(","):
        for target in args.platforms.split(","):
            config = cliquenet_cifar10.get_config()
            config.model.update(k=args.k, T=args.T, unroll=form == "unrolled")
            config = lower.for_platform(config, target)
            start = time.perf_counter()
            train = lower.traced_steps(config)[0]
            traced = time.perf_counter()
            lowered = train.lower(lowering_platforms=(target,))
            done = time.perf_counter()
            row = {"form": form, "platform": target, "k": args.k, "T": args.T,
                   "remat": config.train.remat, "kernels": config.train.kernels,
                   "batch": config.train.batch_size, "trace_s": round(traced - start, 1),
                   "lower_s": round(done - traced, 1)}
            if target == jax.default_backend():
                lowered.compile()
                row["compile_s"] = round(time.perf_counter() - done, 1)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
