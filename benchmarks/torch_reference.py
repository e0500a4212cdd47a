"""PyTorch CliqueNet (CIFAR model, docs/papers.md §1, variant II+II): the baseline a user would
write in PyTorch, used to check that our JAX model computes the same function and to
benchmark its training step.

Each clique layer i owns one kernel over every input it ever sees, in the order
[X0, X1 .. X_{i-1}, X_{i+1} .. X_n]. Stage I (inputs X0, X1 .. X_{i-1}) uses a leading slice of
it and Stage II (inputs X_j, j != i) the trailing slice from X1 on, so the kernels shared by
both stages are stored once and no kernel is ever concatenated.

    python benchmarks/torch_reference.py --check    # logits equal to ours
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BN_MOMENTUM = 0.001  # torch's momentum is 1 - decay; the TF original: decay 0.999, eps 1e-3
BN_EPSILON = 1e-3
STEM_CHANNELS = 64
MODES = ("float32", "channels_last", "bf16_autocast", "bf16_channels_last")


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPSILON, momentum=BN_MOMENTUM)


def he_truncated_normal_(tensor: torch.Tensor, fan_in: int) -> None:
    """TF variance scaling (2.0, fan_in, truncated normal): cut at 2 std, std corrected."""
    std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(tensor, 0.0, std, -2 * std, 2 * std)


def bn_relu_conv(x, bn, weight, dropout_rate, training, padding=0):
    y = F.relu(bn(x), inplace=True)
    return F.dropout(F.conv2d(y, weight, padding=padding), dropout_rate, training)


class CliqueBlock(nn.Module):
    """Stage I then Stage II; returns (block feature, transit feature)."""

    def __init__(self, in_channels: int, k: int, n: int, dropout_rate: float):
        super().__init__()
        self.in_channels, self.dropout_rate = in_channels, dropout_rate
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(k, in_channels + (n - 1) * k, 3, 3)) for _ in range(n))
        self.bn_one = nn.ModuleList(batch_norm(in_channels + i * k) for i in range(n))
        self.bn_two = nn.ModuleList(batch_norm((n - 1) * k) for _ in range(n))
        for weight in self.weights:
            with torch.no_grad():
                he_truncated_normal_(weight[:, :in_channels], 9 * in_channels)
                he_truncated_normal_(weight[:, in_channels:], 9 * k)

    def _layer(self, x, bn, weight):
        return bn_relu_conv(x, bn, weight, self.dropout_rate, self.training, padding=1)

    def forward(self, x0):
        features = []
        for weight, bn in zip(self.weights, self.bn_one, strict=True):
            x = torch.cat([x0, *features], 1) if features else x0
            features.append(self._layer(x, bn, weight[:, : x.shape[1]]))
        for i, (weight, bn) in enumerate(zip(self.weights, self.bn_two, strict=True)):
            x = torch.cat(features[:i] + features[i + 1 :], 1)
            features[i] = self._layer(x, bn, weight[:, self.in_channels :])
        transit = torch.cat(features, 1)
        return torch.cat([x0, transit], 1), transit


class Transition(nn.Module):
    """BN -> ReLU -> 1x1 conv C -> C -> dropout -> 2x2 average pool."""

    def __init__(self, channels: int, dropout_rate: float):
        super().__init__()
        self.dropout_rate = dropout_rate
        self.bn = batch_norm(channels)
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        he_truncated_normal_(self.conv.weight.data, channels)

    def forward(self, x):
        y = bn_relu_conv(x, self.bn, self.conv.weight, self.dropout_rate, self.training)
        return F.avg_pool2d(y, 2)


class TorchCliqueNet(nn.Module):
    """Stem, three clique blocks with two transitions, multi-scale head. Input NCHW."""

    def __init__(self, k: int, T: int, num_classes: int, dropout_rate: float = 0.2):
        super().__init__()
        n = T // 3
        if n < 2:
            raise ValueError(f"T={T} gives {n} layers per block; II+II needs T >= 6")
        self.stem = nn.Conv2d(3, STEM_CHANNELS, 3, padding=1, bias=False)
        he_truncated_normal_(self.stem.weight.data, 27)
        in_channels = [STEM_CHANNELS, n * k, n * k]
        self.blocks = nn.ModuleList(CliqueBlock(c, k, n, dropout_rate) for c in in_channels)
        self.transitions = nn.ModuleList(Transition(n * k, dropout_rate) for _ in range(2))
        self.pools = nn.ModuleList(batch_norm(c + n * k) for c in in_channels)
        self.classifier = nn.Linear(sum(in_channels) + 3 * n * k, num_classes)
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, images):
        x = self.stem(images)
        pooled = []
        for b, (block, pool) in enumerate(zip(self.blocks, self.pools, strict=True)):
            block_feature, transit = block(x)
            pooled.append(F.relu(pool(block_feature), inplace=True).mean((2, 3)))
            if b < len(self.transitions):
                x = self.transitions[b](transit)
        return self.classifier(torch.cat(pooled, 1))

    def count_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- flax -> torch


def _copy(target: torch.Tensor, value) -> None:
    target.copy_(torch.from_numpy(np.array(value, dtype=np.float32)))


def _copy_bn(bn: nn.BatchNorm2d, params, stats) -> None:
    _copy(bn.weight, params["scale"])
    _copy(bn.bias, params["bias"])
    _copy(bn.running_mean, stats["mean"])
    _copy(bn.running_var, stats["var"])


def _hwio_to_oihw(kernel) -> np.ndarray:
    return np.transpose(np.asarray(kernel), (3, 2, 0, 1))


def _load_block(block: CliqueBlock, params, stats) -> None:
    n = len(block.weights)
    for i in range(1, n + 1):
        pieces = [params[f"W_{j}to{i}"] for j in range(n + 1) if j != i]
        _copy(block.weights[i - 1], _hwio_to_oihw(np.concatenate(pieces, axis=2)))
        for stage, bns in (("I", block.bn_one), ("II", block.bn_two)):
            name = f"BN_{stage}_{i}"
            _copy_bn(bns[i - 1], params[name], stats[name])


@torch.no_grad()
def load_from_flax(torch_model: TorchCliqueNet, flax_variables) -> None:
    """Copies our `{"params", "batch_stats"}` (cliquejax CliqueNet) into `torch_model`."""
    params, stats = flax_variables["params"], flax_variables["batch_stats"]
    _copy(torch_model.stem.weight, _hwio_to_oihw(params["stem"]["kernel"]))
    for b, block in enumerate(torch_model.blocks, start=1):
        _load_block(block, params[f"block{b}"], stats[f"block{b}"])
        _copy_bn(torch_model.pools[b - 1], params[f"pool{b}"]["bn"], stats[f"pool{b}"]["bn"])
    for b, transition in enumerate(torch_model.transitions, start=1):
        unit, unit_stats = params[f"transition{b}"]["unit"], stats[f"transition{b}"]["unit"]
        _copy(transition.conv.weight, _hwio_to_oihw(unit["conv"]["kernel"]))
        _copy_bn(transition.bn, unit["bn"], unit_stats["bn"])
    _copy(torch_model.classifier.weight, np.asarray(params["classifier"]["kernel"]).T)
    _copy(torch_model.classifier.bias, params["classifier"]["bias"])


# ----------------------------------------------------------------------------- checks


def build_ours(k: int, T: int, num_classes: int, dropout_rate: float = 0.2):
    """Our flax CliqueNet for the same configuration (imports JAX only when needed)."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from cliquejax.models import build_model
    from configs import cliquenet_cifar10

    config = cliquenet_cifar10.get_config()
    config.model.update(k=k, T=T, dropout_rate=dropout_rate)
    return build_model(config, num_classes)


def forward(model, variables, images, train: bool):
    """Our model's (logits, batch-stat updates), jitted: eager JAX compiles op by op."""
    import jax

    apply = lambda v, x: model.apply(v, x, train=train, mutable=["batch_stats"])
    return jax.jit(apply)(variables, images)


def random_variables(model, images, seed: int = 0):
    """Variables for `model` with random kernels (He scale), BN scales and biases, and the
    BN statistics of `images`, as a trained model would have them. (With the init statistics
    the unnormalised logits reach ~1e3, where float32 rounding alone exceeds 1e-4; the random
    values also spare `model.init`, which takes seconds.)"""
    import jax

    from cliquejax.ops import TF_BN

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "scale":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if name == "bias":
            return rng.normal(0.0, 0.1, shape).astype(np.float32)
        fan_in = math.prod(shape[:-1])
        return rng.normal(0.0, math.sqrt(2.0 / fan_in), shape).astype(np.float32)

    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
    # From zero running statistics one training step leaves (1 - decay) * batch statistics.
    zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, np.float32), shapes["batch_stats"])
    _, updates = forward(model, {"params": params, "batch_stats": zeros}, images, train=True)
    stats = jax.tree.map(lambda s: s / (1.0 - TF_BN.momentum), updates["batch_stats"])
    return {"params": params, "batch_stats": stats}


def check_equal_logits(k: int = 36, T: int = 12, batch: int = 4, num_classes: int = 10):
    """Max |our logits - torch logits| in inference mode and in training mode (dropout 0,
    batch statistics), float32. Raises AssertionError if either is >= 1e-4."""
    rng = np.random.default_rng(1)
    calibration, images = rng.normal(size=(2, max(batch, 8), 32, 32, 3)).astype(np.float32)
    images = images[:batch]
    ours = build_ours(k, T, num_classes, dropout_rate=0.0)
    variables = random_variables(ours, calibration)
    theirs = TorchCliqueNet(k, T, num_classes, dropout_rate=0.0)
    load_from_flax(theirs, variables)
    torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    differences = {}
    for mode, train in (("inference", False), ("training", True)):
        expected = forward(ours, variables, images, train)[0]
        with torch.no_grad():
            got = theirs.train(train)(torch_images).numpy()
        differences[mode] = float(np.max(np.abs(np.asarray(expected) - got)))
    assert max(differences.values()) < 1e-4, differences
    return differences


# ----------------------------------------------------------------------------- benchmark


def make_train_step(model: nn.Module, mode: str = "float32"):
    """One SGD step (Nesterov 0.9, lr 0.1, weight decay 1e-4, cross-entropy) per call.

    `step(images, labels) -> float loss`; images NCHW float32, labels int64. Channels-last
    modes convert the model here, once, and the images on every call."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
    memory_format = torch.channels_last if "channels_last" in mode else torch.contiguous_format
    use_bf16 = mode.startswith("bf16")
    model.to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                weight_decay=1e-4)

    def step(images: torch.Tensor, labels: torch.Tensor) -> float:
        images = images.to(memory_format=memory_format)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare logits with ours")
    parser.add_argument("--k", type=int, default=36)
    parser.add_argument("--T", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    if not args.check:
        parser.error("nothing to do; pass --check")
    differences = check_equal_logits(args.k, args.T, args.batch)
    print(f"k={args.k} T={args.T} batch={args.batch} max |logit difference|: "
          + ", ".join(f"{mode} {value:.2e}" for mode, value in differences.items()))


if __name__ == "__main__":
    main()
