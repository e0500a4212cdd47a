"""Worker: times the PyTorch baseline's training step for one model and one mode, in this
process (2 threads), and prints one JSON line (compare.py starts it, one process per side).

The step is `torch_reference.make_train_step` (SGD, Nesterov momentum 0.9, weight decay
1e-4, cross-entropy; eager mode) on the model of `torch_reference.py` (CliqueNet) or
`torch_models.py` (MBCliqueNet, CliqueNet-S0), on random NCHW batches made before timing.
first_step_s is the first step (PyTorch has no separate compile), then --warmup untimed and
--steps timed steps; peak_rss_mb is the process's peak RSS (VmHWM) at the end.

    python benchmarks/torch_step.py --model=cliquenet_k36_T12 --mode=bf16_channels_last
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402

THREADS = 2
PLACED_BATCHES = 2


def build_model(args, num_classes: int):
    from benchmarks import torch_models, torch_reference

    if args.model == "cliquenet_k36_T12":
        return torch_reference.TorchCliqueNet(args.k or 36, args.T or 12, num_classes)
    if args.k or args.T:
        raise ValueError("--k and --T apply to CliqueNet (CIFAR) only")
    if args.model == "mbclique_cifar10":
        from configs import mbclique_cifar10

        m = mbclique_cifar10.get_config().model
        return torch_models.TorchMBCliqueNet(tuple(m.widths), tuple(m.layers), m.K, num_classes,
                                             m.bn_momentum)
    return torch_models.TorchCliqueNetImageNet("S0", num_classes)


def measure(args) -> dict:
    import torch

    from benchmarks import torch_reference

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    spec = harness.MODELS[args.model]
    batch = args.batch or spec["batch"]
    size = args.image_size or spec["image_size"]
    model = build_model(args, spec["num_classes"])
    run = torch_reference.make_train_step(model, args.mode)
    batches = [(torch.randn(batch, 3, size, size),
                torch.randint(0, spec["num_classes"], (batch,))) for _ in range(PLACED_BATCHES)]
    calls = [0]

    def run_step():
        run(*batches[calls[0] % PLACED_BATCHES])  # returns loss.item(): the step has finished
        calls[0] += 1

    rss_before = harness.rss_mb()
    started = time.perf_counter()
    run_step()
    first_step_s = time.perf_counter() - started
    seconds = harness.time_steps(run_step, args.warmup, args.steps, args.budget_s)
    return harness.step_result(
        seconds, batch, compile_s=None, first_step_s=first_step_s,
        rss_before_compile_mb=rss_before, threads=torch.get_num_threads(),
        torch=torch.__version__, params=model.count_params())


def main(argv=None) -> None:
    from benchmarks.torch_reference import MODES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(harness.MODELS), required=True)
    parser.add_argument("--mode", choices=MODES, default="float32")
    harness.add_step_args(parser)
    args = parser.parse_args(argv)
    harness.emit(dict(measure(args), model=args.model, mode=args.mode))


if __name__ == "__main__":
    main()
