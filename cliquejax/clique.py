"""One clique block as pure functions (CliqueNet, Yang et al., CVPR 2018: Stage I,
Stage II, and the variants of the authors' README).

Parameters of a block are a flat dict whose keys name the pieces of the paper:

  W_{j}to{i}             3x3 (1x1 with bottleneck) kernel from layer j to layer i; j = 0 is
                         the block input X0 (c0 -> k), otherwise k -> k. Shared by both stages.
  BN_I_{i}, BN_II_{i}    {"scale", "bias"} of layer i's BN in Stage I / Stage II, over the
                         channels of that layer's concatenated input.
  W_bottleneck_{i}       (bottleneck only) the 3x3 k -> k conv after the clique conv, shared
  BN_I_bottleneck_{i},   by both stages; its BNs are per stage.
  BN_II_bottleneck_{i}
  W_II_{j}to{i},         Stage II's own kernels, only where `BlockSpec.stage_two_kernels`
  W_bottleneck_II_{i}    says the stages do not share them (an MBCliqueNet reading; CliqueNet
                         shares every kernel).

Batch statistics use the same BN names with {"mean", "var"}.

Two formulations give the same outputs and gradients:
- unrolled: a Python loop over layers; each update concatenates exactly its inputs.
- loop: `jax.lax.fori_loop` over layers. The features live in one fixed-size channel buffer
  (Stage I: [X0, X1..Xn], zeros where a layer is not computed yet; Stage II: [X1..Xn]).
  Layer i's kernel pieces are concatenated once, before the loop, into a kernel over the
  whole buffer with zero rows for the channels it must not see (Stage I: layers >= i;
  Stage II: layer i itself); its BN parameters are padded with zero scale and bias there,
  so those channels contribute exactly nothing. The loop body is then shape-invariant:
  BN-ReLU-conv over the buffer, then a dynamic slice update writes X_i in place. It
  compiles one body per stage instead of n, at the price of convolving over the padding.

Rematerialisation (`BlockSpec.remat`, `config.train.remat`): "layer" wraps each layer update
in `jax.checkpoint` (unrolled: the concatenation of its inputs too, so only the features
X_j it reads are kept; loop: the loop body), "block" wraps the whole block;
"layer_keep_1x1" is "layer" keeping the output of each bottleneck layer's 1x1 conv (k
channels), so that no convolution is recomputed, at the memory of those outputs. The
backward pass then recomputes those activations instead of storing them; values are
unchanged. What is kept is tagged by name (`ops.BN_MOMENTS`, `ops.CLIQUE_1X1`).

The operations themselves (BN-ReLU, convolution, dropout) come from `spec.ops` (`ops.Ops`:
stock JAX operations, or the XLA:CPU kernels of `cliquejax/cpu/`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from cliquejax import ops
from cliquejax.names import (
    BIAS,
    MEAN,
    SCALE,
    VAR,
    bottleneck_kernel,
    clique_kernel,
    stage_two_kernel,
)

VARIANTS = ("II+II", "I+I", "I+II", "X")
# Which kernels Stage II has of its own: none (CliqueNet), the clique kernels, or all.
STAGE_TWO_KERNELS = ("shared", "own_clique", "own")
# What `jax.checkpoint` wraps (module docstring).
REMAT_POLICIES = ("none", "layer", "layer_keep_1x1", "block")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Static description of one clique block."""

    in_channels: int  # c0
    channels: int  # k
    num_layers: int  # n
    variant: str = "II+II"
    x: int = 0  # variant X: layers 1..x get a Stage-II update
    bottleneck: bool = False
    dropout_rate: float = 0.2
    bn: ops.BNSpec = ops.TF_BN
    unroll: bool = True
    dtype: jnp.dtype | None = None  # conv compute dtype; None keeps the input's
    remat: str = "none"  # REMAT_POLICIES (module docstring)
    ops: ops.Ops = ops.REFERENCE  # the operations (`cliquejax.kernels`)
    stage_two_kernels: str = "shared"  # STAGE_TWO_KERNELS

    @property
    def kernel_size(self) -> int:
        return 1 if self.bottleneck else 3

    @property
    def stage_two_layers(self) -> int:
        """How many layers get a Stage-II update (and own Stage-II BNs)."""
        return {"II+II": self.num_layers, "I+II": self.num_layers, "I+I": 0, "X": self.x}[
            self.variant
        ]

    def stage_one_inputs(self, i: int) -> list[int]:
        return list(range(i))  # X0, X1 .. X_{i-1}

    def stage_two_inputs(self, i: int) -> list[int]:
        return [j for j in range(1, self.num_layers + 1) if j != i]

    def piece_channels(self, j: int) -> int:
        return self.in_channels if j == 0 else self.channels

    def clique_name(self, stage: int, j: int, i: int) -> str:
        """The kernel from layer j to layer i that `stage` convolves with."""
        own = stage == 2 and self.stage_two_kernels != "shared"
        return stage_two_kernel(kernel_name(j, i)) if own else kernel_name(j, i)

    def bottleneck_name(self, stage: int, i: int) -> str:
        own = stage == 2 and self.stage_two_kernels == "own"
        return stage_two_kernel(bottleneck_kernel(i)) if own else bottleneck_kernel(i)


def kernel_name(j: int, i: int) -> str:
    return clique_kernel(j, i)


def bn_name(stage: int, i: int, bottleneck: bool = False) -> str:
    return f"BN_{'I' * stage}_{'bottleneck_' if bottleneck else ''}{i}"


def param_layout(spec: BlockSpec) -> dict[str, tuple]:
    """Every parameter of the block: name -> ("kernel", shape, fan_in) or ("bn", channels)."""
    n, k, ks = spec.num_layers, spec.channels, spec.kernel_size
    layout: dict[str, tuple] = {}
    for i in range(1, n + 1):
        for j in range(n + 1):
            if j != i:
                cin = spec.piece_channels(j)
                layout[kernel_name(j, i)] = ("kernel", (ks, ks, cin, k))
    for i in range(1, n + 1):
        layout[bn_name(1, i)] = ("bn", spec.in_channels + (i - 1) * k)
        if spec.bottleneck:
            layout[bottleneck_kernel(i)] = ("kernel", (3, 3, k, k))
            layout[bn_name(1, i, True)] = ("bn", k)
    for i in range(1, spec.stage_two_layers + 1):
        layout[bn_name(2, i)] = ("bn", (n - 1) * k)
        if spec.bottleneck:
            layout[bn_name(2, i, True)] = ("bn", k)
        for j in spec.stage_two_inputs(i):
            layout.setdefault(spec.clique_name(2, j, i), ("kernel", (ks, ks, k, k)))
        if spec.bottleneck:
            layout.setdefault(spec.bottleneck_name(2, i), ("kernel", (3, 3, k, k)))
    return layout


def _layer(x, kernel, bn, bottleneck, seed, train, spec: BlockSpec):
    """BN -> ReLU -> conv -> dropout [-> BN -> ReLU -> 3x3 conv -> dropout] on a concatenated
    input. `bn` is (params, stats); `bottleneck` is (params, stats, kernel) or None.
    Returns (output, new BN stats, new bottleneck BN stats or None)."""
    k = spec.ops
    y, new_bn = k.bn_relu(x, bn[0], bn[1], train, spec.bn)
    y = k.conv2d(y, kernel, dtype=spec.dtype, name=None if bottleneck is None else ops.CLIQUE_1X1)
    y = k.dropout(y, spec.dropout_rate, k.fold_in(seed, 0), train)
    if bottleneck is None:
        return y, new_bn, None
    b_params, b_stats, b_kernel = bottleneck
    y, new_b = k.bn_relu(y, b_params, b_stats, train, spec.bn)
    y = k.conv2d(y, b_kernel, dtype=spec.dtype)
    return k.dropout(y, spec.dropout_rate, k.fold_in(seed, 1), train), new_bn, new_b


def _layer_policy(spec: BlockSpec):
    """The `jax.checkpoint` policy of one layer update; None: layers are not rematerialised."""
    if spec.remat == "layer_keep_1x1":
        return ops.REMAT_SAVED_WITH_1X1
    return ops.REMAT_SAVED if spec.remat == "layer" else None


@functools.cache
def _remat_if(policy, fn, **static):
    """`fn` with its static (non-array) arguments bound, under `jax.checkpoint` with `policy`
    unless that is None. One function object per (policy, fn, static): JAX caches the trace
    of a checkpointed function by its identity, so equal-shaped layers are traced once."""
    bound = functools.partial(fn, **static)
    return bound if policy is None else jax.checkpoint(bound, policy=policy)


# ----------------------------------------------------------------------------- unrolled


def _concat_layer(features, pieces, bn, bottleneck, seed, train, spec):
    """`_layer` on the concatenation of `features`, with the matching kernel `pieces`."""
    x, kernel = jnp.concatenate(features, axis=-1), jnp.concatenate(pieces, axis=2)
    return _layer(x, kernel, bn, bottleneck, seed, train, spec)


def _update_unrolled(params, stats, stage, i, pieces, seed, train, spec):
    """Layer i of `stage` from `pieces` [(source j, X_j)]; writes new BN stats into `stats`."""
    name, b_name = bn_name(stage, i), bn_name(stage, i, True)
    bott = ((params[b_name], stats[b_name], params[spec.bottleneck_name(stage, i)])
            if spec.bottleneck else None)
    layer = _remat_if(_layer_policy(spec), _concat_layer, train=train, spec=spec)
    y, stats[name], new_b = layer([f for _, f in pieces],
                                  [params[spec.clique_name(stage, j, i)] for j, _ in pieces],
                                  (params[name], stats[name]), bott,
                                  spec.ops.fold_in(seed, stage, i))
    if spec.bottleneck:
        stats[b_name] = new_b
    return y


def stage_one_unrolled(params, stats, x0, seed, train, spec: BlockSpec):
    """Stage I: X_i = layer(concat(X0, X_1 .. X_{i-1})). Returns ([X_1..X_n], stats)."""
    stats = dict(stats)
    features = [x0]
    for i in range(1, spec.num_layers + 1):
        pieces = list(zip(spec.stage_one_inputs(i), features, strict=True))
        features.append(_update_unrolled(params, stats, 1, i, pieces, seed, train, spec))
    return features[1:], stats


def stage_two_unrolled(params, stats, features, seed, train, spec: BlockSpec):
    """Stage II for layers 1..spec.stage_two_layers, in place, in order (CliqueNet's
    alternate update)."""
    stats, features = dict(stats), list(features)
    for i in range(1, spec.stage_two_layers + 1):
        pieces = [(j, features[j - 1]) for j in spec.stage_two_inputs(i)]
        features[i - 1] = _update_unrolled(params, stats, 2, i, pieces, seed, train, spec)
    return features, stats


# ----------------------------------------------------------------------------- lax loop


def _insert(a, at: int, size: int, fill: float, axis: int = 0):
    shape = list(a.shape)
    shape[axis] = size
    block = jnp.full(shape, fill, a.dtype)
    before = jax.lax.slice_in_dim(a, 0, at, axis=axis)
    after = jax.lax.slice_in_dim(a, at, a.shape[axis], axis=axis)
    return jnp.concatenate([before, block, after], axis=axis)


def _remove(a, at: int, size: int):
    return jnp.concatenate([a[:at], a[at + size :]])


def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _take(tree, idx):
    return jax.tree.map(lambda a: a[idx], tree)


def _put(tree, idx, values):
    return jax.tree.map(lambda a, v: a.at[idx].set(v), tree, values)


def _stage_loop(params, stats, buffer, stage, offset, gap_size, seed, train, spec: BlockSpec):
    """Updates layers 1..L of `stage` in a fixed-size buffer (module docstring).

    Layer i writes channels [at, at + k) with at = offset + (i - 1) * k, and must not see
    channels [at, at + gap_size(i)): Stage I hides X_i.. X_n, Stage II only X_i itself."""
    k = spec.channels
    layers = range(1, spec.num_layers + 1) if stage == 1 else range(1, spec.stage_two_layers + 1)
    inputs = spec.stage_one_inputs if stage == 1 else spec.stage_two_inputs
    gaps = [(offset + (i - 1) * k, gap_size(i)) for i in layers]
    weights = jnp.stack([
        _insert(jnp.concatenate([params[spec.clique_name(stage, j, i)] for j in inputs(i)], 2),
                at, n, 0, 2)
        for i, (at, n) in zip(layers, gaps, strict=True)
    ])
    fills = {SCALE: 0.0, BIAS: 0.0, MEAN: 0.0, VAR: 1.0}
    pad = lambda tree, at, n: {key: _insert(v, at, n, fills[key]) for key, v in tree.items()}
    names = [bn_name(stage, i) for i in layers]
    bn_p = _stack([pad(params[m], *g) for m, g in zip(names, gaps, strict=True)])
    bn_s = _stack([pad(stats[m], *g) for m, g in zip(names, gaps, strict=True)])
    b_names = [bn_name(stage, i, True) for i in layers] if spec.bottleneck else []
    b_p = _stack([params[m] for m in b_names] or [{}])
    b_s = _stack([stats[m] for m in b_names] or [{}])
    b_k = (jnp.stack([params[spec.bottleneck_name(stage, i)] for i in layers])
           if spec.bottleneck else None)

    def body(idx, carry):
        buffer, bn_s, b_s = carry
        bott = (_take(b_p, idx), _take(b_s, idx), b_k[idx]) if spec.bottleneck else None
        y, new_bn, new_b = _layer(buffer, weights[idx], (_take(bn_p, idx), _take(bn_s, idx)),
                                  bott, spec.ops.fold_in(seed, stage, idx + 1), train, spec)
        buffer = jax.lax.dynamic_update_slice_in_dim(buffer, y, offset + idx * k, axis=3)
        b_s = _put(b_s, idx, new_b) if spec.bottleneck else b_s
        return buffer, _put(bn_s, idx, new_bn), b_s

    policy = _layer_policy(spec)
    if policy is not None:  # prevent_cse=False is safe (and faster) inside a loop
        body = jax.checkpoint(body, prevent_cse=False, policy=policy)
    buffer, bn_s, b_s = jax.lax.fori_loop(0, len(layers), body, (buffer, bn_s, b_s))
    stats = dict(stats)
    for idx, (name, (at, n)) in enumerate(zip(names, gaps, strict=True)):
        stats[name] = {key: _remove(v[idx], at, n) for key, v in bn_s.items()}
    for idx, name in enumerate(b_names):
        stats[name] = _take(b_s, idx)
    return buffer, stats


def _split_channels(x, count: int, size: int, offset: int = 0):
    return [x[..., offset + i * size : offset + (i + 1) * size] for i in range(count)]


def stage_one_loop(params, stats, x0, seed, train, spec: BlockSpec):
    """Stage I as a `fori_loop` over a [X0, X1..Xn] buffer. Same contract as the unrolled."""
    n, k, c0 = spec.num_layers, spec.channels, spec.in_channels
    buffer = jnp.concatenate([x0, jnp.zeros(x0.shape[:3] + (n * k,), x0.dtype)], axis=-1)
    hidden = lambda i: (n - i + 1) * k  # X_i .. X_n are not inputs of layer i
    buffer, stats = _stage_loop(params, stats, buffer, 1, c0, hidden, seed, train, spec)
    return _split_channels(buffer, n, k, c0), stats


def stage_two_loop(params, stats, features, seed, train, spec: BlockSpec):
    """Stage II as a `fori_loop` over a [X1..Xn] buffer. Same contract as the unrolled."""
    if spec.stage_two_layers == 0:
        return list(features), dict(stats)
    buffer = jnp.concatenate(features, axis=-1)
    k = spec.channels
    buffer, stats = _stage_loop(params, stats, buffer, 2, 0, lambda i: k, seed, train, spec)
    return _split_channels(buffer, spec.num_layers, k), stats


# ----------------------------------------------------------------------------- the block


def clique_block(params, stats, x0, rng, train: bool, spec: BlockSpec):
    """Runs one block. Returns (block_feature, transit_feature, new_stats) per the variant
    (CliqueNet README: I+I, I+II, II+II, X; block feature -> head, transit feature -> next
    block)."""
    block_policy = ops.REMAT_SAVED if spec.remat == "block" else None
    block = _remat_if(block_policy, _block, train=train, spec=spec)
    return block(params, stats, x0, spec.ops.fold_in(rng))


def _block(params, stats, x0, seed, train: bool, spec: BlockSpec):
    stage_one = stage_one_unrolled if spec.unroll else stage_one_loop
    stage_two = stage_two_unrolled if spec.unroll else stage_two_loop
    first, stats = stage_one(params, stats, x0, seed, train, spec)
    if spec.variant == "I+I":
        return jnp.concatenate([x0, *first], -1), jnp.concatenate(first, -1), stats
    second, stats = stage_two(params, stats, first, seed, train, spec)
    block_input = first if spec.variant == "I+II" else second
    return jnp.concatenate([x0, *block_input], -1), jnp.concatenate(second, -1), stats
