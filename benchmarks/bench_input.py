"""Input pipeline speed: training images per second, with random flip and crop on.

Times each `next()` of the train iterator after a warm-up and reports the median as
images/s (and the overall rate over the timed batches). Usage:

    python benchmarks/bench_input.py [--batches 300] [--out runs/bench_input.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cliquejax import data  # noqa: E402
from configs.default import get_config  # noqa: E402

CASES = (  # (data set, global batch size)
    ("digits", 128),
    ("synthetic", 64),
    ("synthetic", 128),
)


def case_config(name: str, data_dir: str, worker_count: int):
    config = get_config().data
    config.update(name=name, data_dir=data_dir, flip=True, worker_count=worker_count)
    if name == "digits":
        config.crop_padding = 2  # the images are 8x8
    else:
        config.update(crop_padding=4, image_size=32, num_classes=10, num_train=4096)
    return config


def measure(config, batch_size: int, warmup: int, batches: int) -> dict:
    """Images/s of the train iterator over `batches` batches after `warmup` batches."""
    iterator = data.make_train_iterator(config, global_batch_size=batch_size, seed=0)
    for _ in range(warmup):
        next(iterator)
    seconds_per_batch = []
    started = time.perf_counter()
    for _ in range(batches):
        batch_started = time.perf_counter()
        batch = next(iterator)
        seconds_per_batch.append(time.perf_counter() - batch_started)
    elapsed = time.perf_counter() - started
    return {
        "data": config.name,
        "batch_size": batch_size,
        "image_shape": list(batch["image"].shape[1:]),
        "flip": bool(config.flip),
        "crop_padding": int(config.crop_padding),
        "worker_count": int(config.worker_count),
        "batches": batches,
        "median_images_per_second": batch_size / statistics.median(seconds_per_batch),
        "overall_images_per_second": batch_size * batches / elapsed,
    }


def print_table(results: list[dict]) -> None:
    header = f"{'data':<10} {'batch':>5} {'image':>10} {'median img/s':>13} {'overall img/s':>14}"
    print(header)
    print("-" * len(header))
    for row in results:
        shape = "x".join(str(size) for size in row["image_shape"])
        print(
            f"{row['data']:<10} {row['batch_size']:>5} {shape:>10} "
            f"{row['median_images_per_second']:>13,.0f} {row['overall_images_per_second']:>14,.0f}"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300, help="timed batches per case")
    parser.add_argument("--warmup", type=int, default=20, help="untimed batches first")
    parser.add_argument("--data_dir", default="data/tfds", help="where digits is built/read")
    parser.add_argument("--worker_count", type=int, default=0, help="grain worker processes")
    parser.add_argument("--out", default="runs/bench_input.json", help="JSON results path")
    args = parser.parse_args(argv)

    results = []
    for name, batch_size in CASES:
        config = case_config(name, args.data_dir, args.worker_count)
        results.append(measure(config, batch_size, args.warmup, args.batches))
    print_table(results)
    report = {
        "benchmark": "input pipeline (train iterator, flip + crop)",
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as out_file:
        json.dump(report, out_file, indent=2)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
