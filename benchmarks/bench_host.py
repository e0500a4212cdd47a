"""What the host costs per training step, against what an accelerator would consume.

    python benchmarks/bench_host.py [--quick] [--out runs/bench_host.json] [--short_epochs]

Prints, on this machine:
1. The input pipeline's training images/s (`data.make_train_iterator`):
   - 32x32 "cifar" augmentation (flip + pad-4 crop) of an in-memory source (synthetic
     CIFAR-sized data, batch 128): the host's gather, then the same with the batch placed
     on the device, then the device's flip + crop + normalisation (`augment.device_view`,
     jitted) on this machine's CPU for reference;
   - 224x224 "imagenet" augmentation (random-resized crop + flip) of a JPEG image folder
     generated here (500x375 images, batch 32), for data.worker_count 0, 1 and 2.
2. The training loop (`loop.run_epochs`: iterator, placement, logging, finite-loss check,
   signals, progress bar) against the bare compiled step over pre-placed batches, on a tiny
   MBCliqueNet (digits, widths 4-4-8, layers 2-2-2, batch 64), in alternating rounds:
   steps/s of each, their ratio, and the host's cost per step. `--short_epochs` instead:
   a whole run of 30 epochs of 22 steps, results.json's images/s against the bare step.
3. The accelerator budget: the training images/s one H100 consumes at 40% of its dense
   bfloat16 peak, from the FLOPs `python -m cliquejax.lower` counts for the config.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cliquejax import platform  # noqa: E402

platform.configure_xla()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cliquejax import data, report  # noqa: E402
from cliquejax.data import augment, pipeline  # noqa: E402
from cliquejax.train import loop, step  # noqa: E402
from configs import mbclique_digits  # noqa: E402
from configs.default import get_config  # noqa: E402

H100_BF16_PEAK = 989e12  # FLOP/s, dense (NVIDIA H100 SXM datasheet)
MFU = 0.40
BUDGET_CONFIGS = ("mbclique_cifar10", "cliquenet_cifar10", "cliquenet_imagenet")
JPEG_SIZE = (500, 375)  # width, height: about ImageNet's mean image


def rate(batch_size: int, produce, batches: int, warmup: int) -> float:
    """Images/s of `produce()` (one batch per call) over `batches` calls after `warmup`."""
    for _ in range(warmup):
        produce()
    started = time.perf_counter()
    for _ in range(batches):
        produce()
    return batch_size * batches / (time.perf_counter() - started)


def cifar_pipeline(batches: int) -> dict:
    config = get_config().data
    config.update(name="synthetic", image_size=32, num_classes=10, num_train=8192,
                  num_test=128, flip=True, crop_padding=4)
    batch_size = 128
    iterator = data.make_train_iterator(config, global_batch_size=batch_size, seed=0)
    host = rate(batch_size, lambda: next(iterator), batches, 5)
    shardings = step.make_shardings(batch_size)
    placed = rate(batch_size, lambda: jax.block_until_ready(
        step.global_batch(next(iterator), shardings)), batches, 5)
    info = data.dataset_info(config)
    view = jax.jit(lambda b: augment.device_view(
        b, augmentation=pipeline.augmentation_from_config(config, info.image_shape),
        mean=info.mean, std=info.std, train=True))
    batch = step.global_batch(next(iterator), shardings)
    device = rate(batch_size, lambda: jax.block_until_ready(view(batch)), batches, 3)
    return {"case": "cifar 32x32 in memory, batch 128", "host_images_per_s": host,
            "placed_images_per_s": placed, "device_augment_images_per_s_this_cpu": device}


def write_jpeg_folder(root: str, per_class: int) -> None:
    rng = np.random.default_rng(0)
    width, height = JPEG_SIZE
    ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.3, 1, height)[:, None, None]
    for split, count in (("train", per_class), ("val", 2)):
        for class_name in ("a", "b"):
            folder = os.path.join(root, split, class_name)
            os.makedirs(folder)
            for index in range(count):
                noise = rng.normal(0, 24, (height, width, 3))
                pixels = np.clip(ramp * rng.uniform(0.5, 1, 3) + noise, 0, 255).astype(np.uint8)
                from PIL import Image

                Image.fromarray(pixels).save(os.path.join(folder, f"{index}.jpg"), quality=90)


def imagenet_pipeline(batches: int, workers: tuple[int, ...]) -> list[dict]:
    batch_size = 32
    rows = []
    with tempfile.TemporaryDirectory() as root:
        write_jpeg_folder(root, per_class=batch_size * (batches + 2) // 2)
        for count in workers:
            config = get_config().data
            config.update(name="image_folder", path=root, image_size=224, augment="imagenet",
                          flip=True, worker_count=str(count))
            iterator = data.make_train_iterator(config, global_batch_size=batch_size, seed=0)
            images_per_s = rate(batch_size, lambda it=iterator: next(it), batches, 2)
            rows.append({"case": f"imagenet 224x224 JPEG folder, batch {batch_size}",
                         "worker_count": count, "images_per_s": images_per_s})
            del iterator  # stops its workers
    return rows


class _Enough(Exception):  # noqa: N818 - ends a timed round of the loop
    pass


class TimingBar(report.ProgressBar):
    """The loop's progress bar, recording when each step was handed over; raises _Enough
    after `steps` steps so the round ends without the final evaluation and save."""

    def __init__(self, steps: int, **kwargs):
        super().__init__(**kwargs)
        self.times, self.steps = [], steps

    def update(self, n: int = 1, **postfix) -> None:
        super().update(n, **postfix)
        self.times.append((time.perf_counter(), time.process_time()))
        if len(self.times) == self.steps:
            raise _Enough


def tiny_config():
    config = mbclique_digits.get_config()
    config.model.widths, config.model.layers = (4, 4, 8), (2, 2, 2)
    config.data.data_dir = os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "data", "tfds")
    config.train.update(epochs=10_000, batch_size=64, eval_every_epochs=10_000,
                        checkpoint_every_epochs=10_000)
    return config


def loop_against_bare_step(steps: int, rounds: int) -> dict:
    config = tiny_config()
    with tempfile.TemporaryDirectory() as workdir:
        trainer = loop.Trainer(config, workdir)
        writer = report.MetricWriter(workdir, enabled=True)
        iterator = data.make_train_iterator(config.data, global_batch_size=64, seed=0)
        placed = [step.global_batch(next(iterator), trainer.shardings) for _ in range(2)]
        trainer.state, _ = trainer.train_step(trainer.state, placed[0])  # compiles
        wall, cpu = {"loop": [], "bare": []}, {"loop": [], "bare": []}
        for _ in range(rounds):
            bar = TimingBar(steps, total_steps=trainer.total_steps,
                            initial=int(trainer.state["step"]), batch_size=64)
            try:
                with loop.SignalFlag() as flag:
                    loop.run_epochs(trainer, flag, writer, bar)
            except _Enough:
                pass
            bar.close()
            half = steps // 2  # the later half: the loop's own pace, its start excluded
            (wall_0, cpu_0), (wall_1, cpu_1) = bar.times[-1 - half], bar.times[-1]
            wall["loop"].append(half / (wall_1 - wall_0))
            cpu["loop"].append(half / (cpu_1 - cpu_0))
            state = trainer.state
            jax.block_until_ready(state)
            wall_0, cpu_0 = time.perf_counter(), time.process_time()
            for index in range(half):
                state, metrics = trainer.train_step(state, placed[index % 2])
            jax.block_until_ready((state, metrics))
            wall["bare"].append(half / (time.perf_counter() - wall_0))
            cpu["bare"].append(half / (time.process_time() - cpu_0))
            trainer.state = state
        writer.close()
        trainer.checkpoints.close()
    result = {"case": "tiny MBCliqueNet, digits, widths 4-4-8, layers 2-2-2, batch 64"}
    for clock, rates in (("wall", wall), ("cpu", cpu)):
        ratios = [a / b for a, b in zip(rates["loop"], rates["bare"], strict=True)]
        loop_rate, bare_rate = statistics.median(rates["loop"]), statistics.median(rates["bare"])
        result[clock] = {"loop_steps_per_s": loop_rate, "bare_steps_per_s": bare_rate,
                         "ratio_median": statistics.median(ratios), "ratios": ratios,
                         "host_ms_per_step": 1e3 * (1 / loop_rate - 1 / bare_rate)}
    return result


def short_epochs_against_bare_step(epochs: int = 30) -> dict:
    """The whole run on short epochs (the digits: 22 steps each, evaluated after each, as
    `launch.py` runs it): results.json's images/s against the bare compiled step over two
    pre-placed batches, timed after it in the same process."""
    config = tiny_config()
    config.train.update(epochs=epochs, eval_every_epochs=1, checkpoint_every_epochs=epochs,
                        log_every_steps=50)
    with tempfile.TemporaryDirectory() as workdir:
        results = loop.train_and_evaluate(config, workdir)
        trainer = loop.Trainer(config, os.path.join(workdir, "bare"))
        iterator = data.make_train_iterator(config.data, global_batch_size=64, seed=0)
        placed = [step.global_batch(next(iterator), trainer.shardings) for _ in range(2)]
        state, metrics = trainer.train_step(trainer.state, placed[0])  # compiles
        jax.block_until_ready(state)
        steps = results["steps"]
        start = time.perf_counter()
        for index in range(steps):
            state, metrics = trainer.train_step(state, placed[index % 2])
        jax.block_until_ready((state, metrics))
        bare = 64 * steps / (time.perf_counter() - start)
    return {"case": f"tiny MBCliqueNet, digits, {epochs} epochs of "
                    f"{steps // epochs} steps, batch 64",
            "run_images_per_s": results["images_per_second"], "bare_images_per_s": bare,
            "ratio": results["images_per_second"] / bare}


def accelerator_budget(name: str) -> dict:
    import importlib

    from cliquejax import lower

    config = importlib.import_module(f"configs.{name}").get_config()
    described = lower.describe(config, "cuda")
    per_image = described["flops"] / described["batch_size"]
    return {"config": name, "train_gflop_per_image": per_image / 1e9,
            "h100_images_per_s_at_40pct": MFU * H100_BF16_PEAK / per_image}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer batches and rounds, one budget config (about a minute)")
    parser.add_argument("--out", default="runs/bench_host.json", help="JSON results path")
    parser.add_argument("--short_epochs", action="store_true",
                        help="only the whole run on 30 short epochs against the bare step")
    args = parser.parse_args(argv)
    if args.short_epochs:
        row = short_epochs_against_bare_step()
        print(f"{row['case']}: run {row['run_images_per_s']:,.0f} images/s (results.json), "
              f"bare step {row['bare_images_per_s']:,.0f} images/s, run / bare "
              f"{row['ratio']:.2f}")
        return row
    quick = args.quick
    results = {"cifar": cifar_pipeline(50 if quick else 300),
               "imagenet": imagenet_pipeline(6 if quick else 20, (0, 1, 2)),
               "loop": loop_against_bare_step(40 if quick else 200, 2 if quick else 5),
               "budget": [accelerator_budget(name) for name in
                          (BUDGET_CONFIGS[:1] if quick else BUDGET_CONFIGS)]}
    cifar = results["cifar"]
    print(f"{cifar['case']}: host {cifar['host_images_per_s']:,.0f} images/s; placed on the "
          f"device {cifar['placed_images_per_s']:,.0f}; device augment on this CPU "
          f"{cifar['device_augment_images_per_s_this_cpu']:,.0f}")
    for row in results["imagenet"]:
        print(f"{row['case']}: worker_count {row['worker_count']}: "
              f"{row['images_per_s']:,.0f} images/s")
    timed = results["loop"]
    for clock, name in (("wall", "wall-clock"), ("cpu", "process CPU time")):
        row = timed[clock]
        print(f"{timed['case']}, by {name}: loop {row['loop_steps_per_s']:.1f} steps/s, bare "
              f"step {row['bare_steps_per_s']:.1f} steps/s, loop / bare "
              f"{row['ratio_median']:.2f} (rounds {', '.join(f'{r:.2f}' for r in row['ratios'])})"
              f"; host {row['host_ms_per_step']:.2f} ms per step")
    for row in results["budget"]:
        print(f"budget {row['config']}: {row['train_gflop_per_image']:.2f} GFLOP per training "
              f"image; one H100 at 40% MFU takes {row['h100_images_per_s_at_40pct']:,.0f} "
              "images/s")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
