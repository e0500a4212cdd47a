"""PyTorch MBCliqueNet (docs/papers.md §3) and CliqueNet-S0..S3 (docs/papers.md §2): the baselines
compare.py times beside ours, written as a PyTorch user would, with the same parameters and
the same function as `cliquejax.models.mbcliquenet` / `cliquenet_imagenet` (no dropout:
both use rate 0). Both use bottleneck clique layers: BN-ReLU-1x1 clique conv over the
concatenated inputs, then BN-ReLU-3x3 conv k -> k shared by both stages (BNs per stage).
As in torch_reference.py, layer i owns one clique kernel over [X0, X1 .. X_{i-1},
X_{i+1} .. X_n]; Stage I uses a leading slice of it, Stage II the trailing slice from X1 on.

MBCliqueNet: 1x1 clique kernels, transitions and head conv are binary (sign with the
clipped straight-through gradient, times the He std sqrt(2 / fan_in) of each kernel
piece); each 3x3 conv is modulated: width / K latent filters, signed, times the block's
K x 3 x 3 M-filter; the stem stays full precision.

    python benchmarks/torch_models.py --check --model=mbclique_cifar10   # logits equal ours
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import torch_reference as ref  # noqa: E402

BN_EPSILON = 1e-5  # nn.BatchNorm2d's default, as the authors' PyTorch code (ops.TORCH_BN)
S_SETTINGS = {"S0": ((36, 64, 100, 80), (5, 6, 6, 6)), "S1": ((36, 80, 120, 100), (5, 6, 6, 6)),
              "S2": ((36, 80, 150, 120), (5, 5, 6, 6)), "S3": ((40, 80, 160, 160), (6, 6, 6, 6))}


def batch_norm(channels: int, decay: float = 0.9, dims: int = 2) -> nn.Module:
    cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    return cls(channels, eps=BN_EPSILON, momentum=1.0 - decay)


class SignSTE(torch.autograd.Function):
    """+1 for w >= 0, else -1; gradient passed where |w| <= 1."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype)


def binary(weight: torch.Tensor) -> torch.Tensor:
    """A 1-bit conv/linear weight with the He scale of its fan-in."""
    return SignSTE.apply(weight) * math.sqrt(2.0 / weight[0].numel())


def normal_(tensor: torch.Tensor, fan: int) -> None:
    nn.init.normal_(tensor, 0.0, math.sqrt(2.0 / fan))


class BottleneckCliqueBlock(nn.Module):
    """II+II clique block of bottleneck layers; returns (block feature, transit feature).
    `stored` is the number of 3x3 filters each layer stores (k; k / K when modulated)."""

    def __init__(self, in_channels: int, k: int, n: int, decay: float, stored: int = 0):
        super().__init__()
        self.in_channels, self.k = in_channels, k
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(k, in_channels + (n - 1) * k, 1, 1)) for _ in range(n))
        self.bottlenecks = nn.ParameterList(
            nn.Parameter(torch.empty(stored or k, k, 3, 3)) for _ in range(n))
        self.bn_one = nn.ModuleList(batch_norm(in_channels + i * k, decay) for i in range(n))
        self.bn_two = nn.ModuleList(batch_norm((n - 1) * k, decay) for _ in range(n))
        self.bn_one_b = nn.ModuleList(batch_norm(k, decay) for _ in range(n))
        self.bn_two_b = nn.ModuleList(batch_norm(k, decay) for _ in range(n))
        with torch.no_grad():  # docs/papers.md §2: N(0, sqrt(2 / (kh * kw * out)))
            for weight, bottleneck in zip(self.weights, self.bottlenecks, strict=True):
                normal_(weight, k)
                normal_(bottleneck, 9 * k)

    def clique_kernel(self, i: int, start: int, stop: int | None):
        return self.weights[i][:, start:stop]

    def bottleneck_kernel(self, i: int):
        return self.bottlenecks[i]

    def _layer(self, x, i: int, stage: int, start: int, stop: int | None):
        bns, bns_b = (self.bn_one, self.bn_one_b) if stage == 1 else (self.bn_two, self.bn_two_b)
        y = F.conv2d(F.relu(bns[i](x), inplace=True), self.clique_kernel(i, start, stop))
        y = F.relu(bns_b[i](y), inplace=True)
        return F.conv2d(y, self.bottleneck_kernel(i), padding=1)

    def forward(self, x0):
        features = []
        for i in range(len(self.weights)):
            x = torch.cat([x0, *features], 1) if features else x0
            features.append(self._layer(x, i, 1, 0, x.shape[1]))
        for i in range(len(self.weights)):
            x = torch.cat(features[:i] + features[i + 1 :], 1)
            features[i] = self._layer(x, i, 2, self.in_channels, None)
        transit = torch.cat(features, 1)
        return torch.cat([x0, transit], 1), transit


class ModulatedCliqueBlock(BottleneckCliqueBlock):
    """Binary 1x1 clique kernels (He std of each piece: X0 or one X_j) and modulated
    binary 3x3 convs sharing the block's M-filter."""

    def __init__(self, in_channels: int, k: int, n: int, num_planes: int, decay: float):
        super().__init__(in_channels, k, n, decay, stored=k // num_planes)
        self.m_filter = nn.Parameter(torch.empty(num_planes, 3, 3))
        fans = [in_channels] * in_channels + [k] * ((n - 1) * k)
        self.register_buffer("scale", torch.tensor([math.sqrt(2.0 / f) for f in fans]))
        with torch.no_grad():  # docs/papers.md §3: latent He fan-in, M-filter unified fan-in
            for weight in self.weights:
                weight[:, :in_channels].normal_(0.0, math.sqrt(2.0 / in_channels))
                weight[:, in_channels:].normal_(0.0, math.sqrt(2.0 / k))
            for bottleneck in self.bottlenecks:
                normal_(bottleneck, 9 * k)
            normal_(self.m_filter, 9 * k)

    def clique_kernel(self, i: int, start: int, stop: int | None):
        signs = SignSTE.apply(self.weights[i][:, start:stop])
        return signs * self.scale[start:stop].view(1, -1, 1, 1)

    def bottleneck_kernel(self, i: int):
        signs = SignSTE.apply(self.bottlenecks[i])  # (k / K, k, 3, 3)
        return (signs[:, None] * self.m_filter[None, :, None]).reshape(self.k, self.k, 3, 3)


class TorchMBCliqueNet(nn.Module):
    """Stem, modulated clique blocks, BN-ReLU-binary 1x1 transitions with 2x2 average pool,
    multi-scale head: binary 1x1 conv (a linear map) to the classes, then BN."""

    def __init__(self, widths=(64, 128, 256), layers=(4, 4, 4), num_planes: int = 4,
                 num_classes: int = 10, decay: float = 0.9):
        super().__init__()
        self.stem = nn.Parameter(torch.empty(widths[0], 3, 3, 3))
        normal_(self.stem.data, 27)
        self.blocks, self.pools = nn.ModuleList(), nn.ModuleList()
        self.transition_bns, self.transitions = nn.ModuleList(), nn.ParameterList()
        in_channels, features = widths[0], 0
        for b, (width, n) in enumerate(zip(widths, layers, strict=True)):
            self.blocks.append(ModulatedCliqueBlock(in_channels, width, n, num_planes, decay))
            self.pools.append(batch_norm(in_channels + n * width, decay))
            features += in_channels + n * width
            if b + 1 < len(widths):
                self.transition_bns.append(batch_norm(n * width, decay))
                kernel = torch.empty(widths[b + 1], n * width, 1, 1)
                normal_(kernel, n * width)
                self.transitions.append(nn.Parameter(kernel))
                in_channels = widths[b + 1]
        self.head = nn.Parameter(torch.empty(num_classes, features))
        normal_(self.head.data, features)
        self.head_bn = batch_norm(num_classes, decay, dims=1)

    def forward(self, images):
        x = F.conv2d(images, self.stem, padding=1)
        pooled = []
        for b, (block, pool) in enumerate(zip(self.blocks, self.pools, strict=True)):
            block_feature, transit = block(x)
            pooled.append(F.relu(pool(block_feature), inplace=True).mean((2, 3)))
            if b < len(self.transitions):
                y = F.relu(self.transition_bns[b](transit), inplace=True)
                x = F.avg_pool2d(F.conv2d(y, binary(self.transitions[b])), 2)
        return self.head_bn(F.linear(torch.cat(pooled, 1), binary(self.head)))

    def count_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class BNReLUConv1x1(nn.Module):
    def __init__(self, cin: int, cout: int, decay: float):
        super().__init__()
        self.bn, self.conv = batch_norm(cin, decay), nn.Conv2d(cin, cout, 1, bias=False)
        normal_(self.conv.weight.data, cout)

    def forward(self, x):
        return self.conv(F.relu(self.bn(x), inplace=True))


class AttentionTransition(nn.Module):
    """BN-ReLU-1x1 conv C -> C, squeeze-excitation (reduction 2), 2x2 average pool."""

    def __init__(self, channels: int, decay: float):
        super().__init__()
        self.unit = BNReLUConv1x1(channels, channels, decay)
        self.squeeze = nn.Linear(channels, channels // 2)
        self.expand = nn.Linear(channels // 2, channels)
        for dense in (self.squeeze, self.expand):
            nn.init.xavier_uniform_(dense.weight)
            nn.init.zeros_(dense.bias)

    def forward(self, x):
        y = self.unit(x)
        gate = torch.sigmoid(self.expand(F.relu(self.squeeze(y.mean((2, 3))))))
        return F.avg_pool2d(y * gate[:, :, None, None], 2)


class TorchCliqueNetImageNet(nn.Module):
    """7x7/2 stem, BN, ReLU, 3x3/2 max pool; bottleneck clique blocks; attentional
    transitions; every block feature compressed to half before BN-ReLU-global pool."""

    def __init__(self, setting: str = "S0", num_classes: int = 1000, decay: float = 0.9):
        super().__init__()
        channels, layers = S_SETTINGS[setting]
        self.stem = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        normal_(self.stem.weight.data, 49 * 64)
        self.stem_bn = batch_norm(64, decay)
        self.blocks, self.compressions = nn.ModuleList(), nn.ModuleList()
        self.pools, self.transitions = nn.ModuleList(), nn.ModuleList()
        in_channels, features = 64, 0
        for b, (k, n) in enumerate(zip(channels, layers, strict=True)):
            self.blocks.append(BottleneckCliqueBlock(in_channels, k, n, decay))
            feature = in_channels + n * k
            self.compressions.append(BNReLUConv1x1(feature, feature // 2, decay))
            self.pools.append(batch_norm(feature // 2, decay))
            features += feature // 2
            if b + 1 < len(channels):
                self.transitions.append(AttentionTransition(n * k, decay))
            in_channels = n * k
        self.classifier = nn.Linear(features, num_classes)
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, images):
        x = F.relu(self.stem_bn(self.stem(images)), inplace=True)
        x = F.max_pool2d(x, 3, 2, 1)
        pooled = []
        for b, block in enumerate(self.blocks):
            block_feature, transit = block(x)
            y = self.compressions[b](block_feature)
            pooled.append(F.relu(self.pools[b](y), inplace=True).mean((2, 3)))
            if b < len(self.transitions):
                x = self.transitions[b](transit)
        return self.classifier(torch.cat(pooled, 1))

    def count_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- flax -> torch


def _load_block(block: BottleneckCliqueBlock, params, stats) -> None:
    n = len(block.weights)
    for i in range(1, n + 1):
        pieces = [params[f"W_{j}to{i}"] for j in range(n + 1) if j != i]
        ref._copy(block.weights[i - 1], ref._hwio_to_oihw(np.concatenate(pieces, axis=2)))
        ref._copy(block.bottlenecks[i - 1], ref._hwio_to_oihw(params[f"W_bottleneck_{i}"]))
        for stage, bns, bns_b in (("I", block.bn_one, block.bn_one_b),
                                  ("II", block.bn_two, block.bn_two_b)):
            for name, bn in ((f"BN_{stage}_{i}", bns), (f"BN_{stage}_bottleneck_{i}", bns_b)):
                ref._copy_bn(bn[i - 1], params[name], stats[name])
    if "M_filter" in params:
        ref._copy(block.m_filter, params["M_filter"])


def _load_unit(unit: BNReLUConv1x1, params, stats) -> None:
    ref._copy(unit.conv.weight, ref._hwio_to_oihw(params["conv"]["kernel"]))
    ref._copy_bn(unit.bn, params["bn"], stats["bn"])


def _load_dense(dense: nn.Linear, params) -> None:
    ref._copy(dense.weight, np.asarray(params["kernel"]).T)
    ref._copy(dense.bias, params["bias"])


@torch.no_grad()
def load_mbclique(model: TorchMBCliqueNet, variables) -> None:
    """Copies our MBCliqueNet `{"params", "batch_stats"}` (latent weights) into `model`."""
    params, stats = variables["params"], variables["batch_stats"]
    ref._copy(model.stem, ref._hwio_to_oihw(params["stem"]["kernel"]))
    for b, block in enumerate(model.blocks, start=1):
        _load_block(block, params[f"block{b}"], stats[f"block{b}"])
        ref._copy_bn(model.pools[b - 1], params[f"pool{b}"]["bn"], stats[f"pool{b}"]["bn"])
    for b, kernel in enumerate(model.transitions, start=1):
        ref._copy(kernel, ref._hwio_to_oihw(params[f"transition{b}"]["kernel"]))
        name = f"transition{b}_bn"
        ref._copy_bn(model.transition_bns[b - 1], params[name], stats[name])
    ref._copy(model.head, np.asarray(params["head_conv"]["kernel"])[0, 0].T)
    ref._copy_bn(model.head_bn, params["head_bn"], stats["head_bn"])


@torch.no_grad()
def load_imagenet(model: TorchCliqueNetImageNet, variables) -> None:
    """Copies our CliqueNet-S* `{"params", "batch_stats"}` into `model`."""
    params, stats = variables["params"], variables["batch_stats"]
    ref._copy(model.stem.weight, ref._hwio_to_oihw(params["stem"]["kernel"]))
    ref._copy_bn(model.stem_bn, params["stem_bn"], stats["stem_bn"])
    for b, block in enumerate(model.blocks, start=1):
        _load_block(block, params[f"block{b}"], stats[f"block{b}"])
        _load_unit(model.compressions[b - 1], params[f"compression{b}"], stats[f"compression{b}"])
        ref._copy_bn(model.pools[b - 1], params[f"pool{b}"]["bn"], stats[f"pool{b}"]["bn"])
    for b, transition in enumerate(model.transitions, start=1):
        p = params[f"transition{b}"]
        _load_unit(transition.unit, p["unit"], stats[f"transition{b}"]["unit"])
        _load_dense(transition.squeeze, p["attention"]["squeeze"])
        _load_dense(transition.expand, p["attention"]["expand"])
    _load_dense(model.classifier, params["classifier"])


# ----------------------------------------------------------------------------- checks

CHECKS = {  # model -> (config file, its argument, image size, classes, torch model, loader)
    "mbclique_cifar10": ("mbclique_cifar10", None, 32, 10, TorchMBCliqueNet, load_mbclique),
    "cliquenet_s0": ("cliquenet_imagenet", "S0", 224, 1000,
                     lambda: TorchCliqueNetImageNet("S0"), load_imagenet),
}


def check_equal_logits(name: str, batch: int = 2, image_size: int = 0) -> dict:
    """Parameter counts (ours, torch) and, in inference and training mode, max |our logits -
    torch logits| (float32) and, as the float32 rounding level of this network, max |torch
    float32 - torch float64 logits|, both over max(1, max |logit|). Raises AssertionError
    if the counts differ or ours differ by more than max(1e-4, 3 x that rounding level)."""
    import jax

    config_name, arg, size, classes, build, load = CHECKS[name]
    size = image_size or size
    ours = importlib.import_module(f"configs.{config_name}").get_config(arg)
    from cliquejax.models import build_model

    model = build_model(ours, classes)
    rng = np.random.default_rng(1)
    calibration, images = rng.normal(size=(2, max(batch, 8), size, size, 3)).astype(np.float32)
    images = images[:batch]
    variables = ref.random_variables(model, calibration)
    # random_variables scales the statistics for decay 0.999; these models use their own.
    rescale = ref.BN_MOMENTUM / (1.0 - ours.model.bn_momentum)
    variables["batch_stats"] = jax.tree.map(lambda s: s * rescale, variables["batch_stats"])
    theirs = build()
    load(theirs, variables)
    counts = {"ours": int(sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))),
              "torch": theirs.count_params()}
    assert counts["ours"] == counts["torch"], counts
    torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    exact = copy.deepcopy(theirs).double()
    differences, noise = {}, {}
    for mode, train in (("inference", False), ("training", True)):
        ours_logits = np.asarray(ref.forward(model, variables, images, train)[0])
        with torch.no_grad():
            got = theirs.train(train)(torch_images).numpy()
            want = exact.train(train)(torch_images.double()).numpy()
        scale = max(float(np.abs(want).max()), 1.0)
        differences[mode] = float(np.abs(ours_logits - got).max()) / scale
        noise[mode] = float(np.abs(got - want).max()) / scale
    tolerance = max(1e-4, 3 * max(noise.values()))
    assert max(differences.values()) < tolerance, (differences, noise)
    return {"params": counts, "ours_vs_torch": differences, "torch_float32_vs_float64": noise}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare logits with ours")
    parser.add_argument("--model", choices=sorted(CHECKS), default="mbclique_cifar10")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=0, help="0: the model's own")
    args = parser.parse_args(argv)
    if not args.check:
        parser.error("nothing to do; pass --check")
    print(args.model, check_equal_logits(args.model, args.batch, args.image_size))


if __name__ == "__main__":
    main()
