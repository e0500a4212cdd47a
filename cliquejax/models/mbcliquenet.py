"""MBCliqueNet, the modulated binary CliqueNet (MBCliqueNet section 2.1).

A CliqueNet II+II whose layers are BN-ReLU-1x1 conv (the clique kernels W[j->i], concatenated
inputs -> width) then BN-ReLU-modulated binary 3x3 conv (width -> width, shared by both
stages, like CliqueNet's bottleneck). Each block owns one M-filter (K, 3, 3) shared by all its
modulated convs. Head: multi-scale pooled block features -> 1x1 conv -> BN on the logits.

Open points of the source, as fields of `MBCliqueNet`, which are the `config.model` fields
(the settings in `configs/mbclique_cifar10.py`; docs/papers.md section 3 says why, and
counts every reading against the published parameter counts, none of which reproduces all
four):
- `binarize`: false gives u-MBCliqueNet (latent filters used as they are, modulation kept).
- `binarize_1x1` / `binarize_transition` / `binarize_head` / `binarize_stem`: which of the
  other convs are 1-bit (not modulated; the M-filter is 3x3). Default: all but the stem,
  the reading of "storage of convolutional filters reduced by at least 32x"; the stem
  (3 input channels, 0.04% of the filters) stays full precision as in most binary networks.
- `sign_fn`: ste_sign (clipped STE, default) | identity_ste | approx_sign. The STE's clip
  masks the gradient; the latent weights themselves are clipped to [-1, 1] after each update
  by the training step (`optimizer.clip_latent`, BinaryConnect's rule), another thing.
- `update_order`: simultaneous (one backward pass gives the gradients of C and M, one step
  applies both, default: MCN's algorithm, docs/papers.md "MBCliqueNet training rule") |
  alternating (C first, then M with the gradient at the new C).
- `clique_conv`: bottleneck (default: each layer a 1x1 conv of its concatenated inputs to the
  width, then one modulated 3x3, section 2.2's "1x1 convolution before the 3x3 convolution") |
  per_connection (eqs. 1-2 read literally: every W_ji a modulated 3x3; a 1x1 conv brings X0
  to the width where it differs).
- `stage_two_kernels`: shared (default: eqs. 1-2 use the same W_ji in both stages, as
  CliqueNet) | own_clique (Stage II has its own clique kernels) | own (and its own 3x3).
- `transition_kernel` 1 (default, CliqueNet's) | 3 (section 3.3's stem, the one "transition
  layer" whose conv the source describes); `transition_width`: next (default: the next
  block's width, as section 3.3's stem takes the first block's) | keep (CliqueNet's C -> C);
  `attention`: CliqueNet's attentional transition (squeeze-excitation, fully-connected
  layers; section 3.2 names "fully-connected layers"), default off.
- `head_input`: x0_and_stage2 (default: the block feature, CliqueNet II+II's {X0, Stage II}) |
  stage2 (section 2: "the output feature maps of each block are Stage-II feature"; the
  feature the block passes on).
- `compression`: CliqueNet's compression (its PyTorch code, which turns it on; `--if_c` of
  its TensorFlow code): BN-ReLU-1x1 conv (1-bit with `binarize_1x1`) halving each block's
  head feature before its pool. Default off: the source names none.
- `variant`, `x`: the clique variant (`clique.VARIANTS`; CliqueNet's README: II+II, the
  source's alternate update, by default), the same wiring CliqueNet's blocks take.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cliquejax import binary, clique, layers, names, ops
from cliquejax.models.common import Model, check_choice, check_lengths, check_range

UPDATES = ("simultaneous", "alternating")
CLIQUE_CONVS = ("bottleneck", "per_connection")
TRANSITION_WIDTHS = ("next", "keep")
HEAD_INPUTS = ("x0_and_stage2", "stage2")  # the variant's block feature | its transit feature
U_LATENT_STD = 1.0  # u-MBCliqueNet: E[C^2] = 1 = E[sign(C)^2], so Q keeps the He scale


class ModulatedCliqueBlock(layers.CliqueBlock):
    """A clique block whose 3x3 convs are modulated binary and whose 1x1 clique kernels are
    (optionally) binary: latent parameters, transformed on use."""

    num_planes: int = 4
    quantize: Callable | None = binary.ste_sign
    binarize_1x1: bool = True

    def weights(self, shapes):
        width, K = self.spec.channels, self.num_planes
        m_filter = self.param(names.M_FILTER,
                              binary.m_filter_init(binary.unified_fan_in(3, width)), (K, 3, 3))
        latent_std = None if self.quantize else U_LATENT_STD
        quantize = self.quantize or (lambda w: w)
        binary_1x1 = self.quantize if self.binarize_1x1 else None
        modulated, plain = {}, {}
        for name, shape in shapes.items():
            if is_modulated(name, self.spec.bottleneck):
                modulated[name] = layers.latent_param(
                    self, name, layers.latent_init(latent_std), (*shape[:3], width // K),
                    self.quantize is not None)
            else:
                plain[name] = layers.latent_param(self, name, binary.binary_kernel_init, shape,
                                                  binary_1x1 is not None)
        # each transform once per block and shape (`layers.transform_stacked`)
        out = layers.transform_stacked(modulated,
                                       lambda w: binary.modulate(quantize(w), m_filter))
        if binary_1x1 is not None:
            plain = layers.transform_stacked(
                plain, lambda w: layers.binary_kernel(binary_1x1(w), True))
        return {name: out[name] if name in out else plain[name] for name in shapes}


class MBCliqueNet(Model):
    """The fields are `config.model`'s (the module docstring, `configs/mbclique_cifar10.py`):
    per block a width and a layer count, K planes of the M-filter."""

    widths: Sequence[int] = (64, 128, 256)
    layers: Sequence[int] = (4, 4, 4)
    K: int = 4
    binarize: bool = True  # False: u-MBCliqueNet
    binarize_stem: bool = False
    binarize_1x1: bool = True
    binarize_transition: bool = True
    binarize_head: bool = True
    sign_fn: str = "ste_sign"  # binary.SIGN_FUNCTIONS
    update_order: str = "simultaneous"  # UPDATES; read by the training step, not the network
    clique_conv: str = "bottleneck"  # CLIQUE_CONVS
    stage_two_kernels: str = "shared"  # clique.STAGE_TWO_KERNELS
    transition_kernel: int = 1
    transition_width: str = "next"  # TRANSITION_WIDTHS
    attention: bool = False
    head_input: str = "x0_and_stage2"  # HEAD_INPUTS
    compression: bool = False
    dropout_rate: float = 0.0
    unroll: bool = True
    variant: str = "II+II"  # clique.VARIANTS
    x: int = 0  # the variant's argument (variant X: layers that get the Stage-II update)

    def __post_init__(self):
        check_lengths({"model.widths": self.widths, "model.layers": self.layers})
        check_range("model.K", self.K, 1)
        for width in self.widths:
            if width % self.K:
                raise ValueError(f"model.K={self.K} does not divide model.widths entry "
                                 f"{width}; allowed: K dividing every width in "
                                 f"{tuple(self.widths)}")
        for n in self.layers:
            clique.check_wiring(self.variant, self.x, n, origin=f"model.layers entry {n}")
        binary.get_sign_function(self.sign_fn, field="model.sign_fn")
        check_choice("model.update_order", self.update_order, UPDATES)
        check_choice("model.clique_conv", self.clique_conv, CLIQUE_CONVS)
        check_choice("model.stage_two_kernels", self.stage_two_kernels,
                     clique.STAGE_TWO_KERNELS)
        check_choice("model.transition_kernel", self.transition_kernel, (1, 3))
        check_choice("model.transition_width", self.transition_width, TRANSITION_WIDTHS)
        check_choice("model.head_input", self.head_input, HEAD_INPUTS)
        check_range("model.dropout_rate", self.dropout_rate, 0.0, 0.99)
        super().__post_init__()

    def conv_filter_equivalent(self, params):
        """Pytree of ints: per leaf of `params`, the filter weights of the full-precision
        network with the same widths and no modulation (K times the latent filters of a
        modulated conv; 0 for M-filters and any non-conv parameter)."""

        def count(path, leaf):
            name = names.leaf_name(path)
            if is_modulated(name, self.clique_conv == "bottleneck"):
                return leaf.size * self.K
            return 0 if name == names.M_FILTER or not names.is_kernel(name) else leaf.size

        return jax.tree_util.tree_map_with_path(count, params)

    @property
    def quantize(self) -> Callable | None:
        """The sign function of the binary weights; None for u-MBCliqueNet."""
        return binary.get_sign_function(self.sign_fn) if self.binarize else None

    def _quantize_if(self, flag: bool):
        return self.quantize if flag else None

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = layers.BinaryConv(self.widths[0], 3, self._quantize_if(self.binarize_stem),
                              self.dtype, self.ops, name="stem")(
            images.astype(self.dtype or jnp.float32))
        pooled = []
        for b, (width, n) in enumerate(zip(self.widths, self.layers, strict=True)):
            if self.clique_conv == "per_connection" and x.shape[-1] != width:
                # every modulated 3x3 of the block takes `width` channels (section 2.2)
                x = layers.BinaryConv(width, 1, self._quantize_if(self.binarize_1x1),
                                      self.dtype, self.ops, name=f"block{b + 1}_input")(x)
            spec = clique.BlockSpec(in_channels=x.shape[-1], channels=width, num_layers=n,
                                    variant=self.variant, x=self.x,
                                    bottleneck=self.clique_conv == "bottleneck",
                                    dropout_rate=self.dropout_rate,
                                    bn=self.bn, unroll=self.unroll,
                                    dtype=self.dtype, remat=self.remat, ops=self.ops,
                                    stage_two_kernels=self.stage_two_kernels)
            block, transit = ModulatedCliqueBlock(
                spec, num_planes=self.K, quantize=self.quantize,
                binarize_1x1=self.binarize_1x1, name=f"block{b + 1}")(x, train)
            head_feature = block if self.head_input == "x0_and_stage2" else transit
            if self.compression:  # CliqueNet's: the head feature halved by a 1x1 conv
                head_feature = layers.BatchNorm(self.bn, relu=True, ops=self.ops,
                                                name=f"compression{b + 1}_bn")(head_feature,
                                                                               train)
                head_feature = layers.BinaryConv(
                    head_feature.shape[-1] // 2, 1, self._quantize_if(self.binarize_1x1),
                    self.dtype, self.ops, name=f"compression{b + 1}")(head_feature)
            pooled.append(layers.checkpointed(layers.PooledFeature, self.remat)(
                self.bn, self.ops, name=f"pool{b + 1}")(head_feature, train))
            if b + 1 < len(self.widths):
                transition = functools.partial(_transition, index=b + 1)
                x = layers.checkpointed(transition, self.remat)(self, transit, train)
        features = jnp.concatenate(pooled, axis=-1)[:, None, None, :]
        logits = layers.BinaryConv(self.num_classes, 1, self._quantize_if(self.binarize_head),
                                   self.dtype, self.ops, name="head_conv")(features)
        head_bn = layers.BatchNorm(self.bn, ops=self.ops, name="head_bn")
        return head_bn(logits[:, 0, 0, :].astype(jnp.float32), train)


def _transition(model: MBCliqueNet, x, train: bool, *, index: int):
    """BN -> ReLU -> (binary) conv -> [attention] -> 2x2 average pool, from block `index` to
    the next: a `transition_kernel` conv to the next block's width (or keeping the channels)."""
    width = model.widths[index] if model.transition_width == "next" else x.shape[-1]
    x = layers.BatchNorm(model.bn, relu=True, ops=model.ops,
                         name=f"transition{index}_bn")(x, train)
    x = layers.BinaryConv(width, model.transition_kernel,
                          model._quantize_if(model.binarize_transition),
                          model.dtype, model.ops, name=f"transition{index}")(x)
    if model.attention:
        x = layers.Attention(name=f"transition{index}_attention")(x)
    return ops.avg_pool(x, 2)


# ----------------------------------------------------------------------------- storage


def is_modulated(name: str, bottleneck: bool) -> bool:
    """Whether clique-block parameter `name` is the latent of a modulated 3x3 conv: the
    bottleneck 3x3s, or (clique_conv = per_connection) every clique kernel."""
    if name.startswith(names.BOTTLENECK_KERNEL_PREFIX):
        return True
    return not bottleneck and name.startswith(names.CLIQUE_KERNEL_PREFIX)
