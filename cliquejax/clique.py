"""One clique block as pure functions (CliqueNet, Yang et al., CVPR 2018: Stage I,
Stage II, and the variants of the authors' README).

A block's wiring is defined once per variant (`Wiring`, `VARIANTS`): which features each
layer reads in Stage I, which layers Stage II updates (in order) from which features, and
what the block passes to the head and to the next block (the paper's section 3, Fig. 2 and
eqs. 1-2 for the stages; the authors' README, Tab. 1 and 2, for the variants). The parameter
layout, the unrolled and the loop forms all read it; a new variant is one function
registered in `VARIANTS`.

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
- loop: `jax.lax.fori_loop` over the updates of a stage. The features live in one fixed-size
  channel buffer (Stage I: [X0, X1..Xn], zeros where a layer is not computed yet; Stage II:
  [X1..Xn], or [X0, X1..Xn] where a Stage-II update reads X0). Each update's kernel pieces
  are concatenated once, before the loop, into a kernel over the whole buffer with zero
  rows for the channels the update does not read; its BN parameters are padded with zero
  scale and bias there, so those channels contribute exactly nothing. The loop body is then
  shape-invariant: BN-ReLU-conv over the buffer, then a dynamic slice update writes X_i in
  place. It compiles one body per stage instead of n, at the price of convolving over the
  padding.

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
import itertools
from collections.abc import Callable

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

# Which kernels Stage II has of its own: none (CliqueNet), the clique kernels, or all.
STAGE_TWO_KERNELS = ("shared", "own_clique", "own")
# What `jax.checkpoint` wraps (module docstring).
REMAT_POLICIES = ("none", "layer", "layer_keep_1x1", "block")


# ----------------------------------------------------------------------------- wiring


@dataclasses.dataclass(frozen=True)
class Wiring:
    """Which features every update of a block of n layers reads, and what the block passes
    on. Feature j = 0 is the block input X0, j = 1..n layer j. A layer concatenates its
    inputs in ascending j; the kernel from j to i is W_{j}to{i}.

    stage_one[i - 1]   the features layer i reads in Stage I (only X0 and layers < i exist).
    stage_two          (i, the features it reads) for each layer Stage II updates, in update
                       order, in place: it reads the latest value of each feature.
    block, transit     what the block passes to the head / to the next block, concatenated:
                       (stage, j) is feature j after Stage I (1) or after Stage II (2).
    every_kernel       every W_{j}to{i} of the clique exists, read or not (the authors' code:
                       in I+I and X the unread ones are counted and decayed); False: those
                       the stages read. Only where the stages share their kernels: a block
                       whose Stage II has its own (`BlockSpec.stage_two_kernels`) builds
                       just the Stage-I kernels Stage I reads (the others would be read by
                       nothing, never learn, and count in no paper's figures).
    """

    stage_one: tuple[tuple[int, ...], ...]
    stage_two: tuple[tuple[int, tuple[int, ...]], ...]
    block: tuple[tuple[int, int], ...]
    transit: tuple[tuple[int, int], ...]
    every_kernel: bool = False

    def __post_init__(self):
        n, updated = len(self.stage_one), [i for i, _ in self.stage_two]
        allowed = [(inputs, range(i)) for i, inputs in enumerate(self.stage_one, 1)]
        allowed += [(inputs, [j for j in range(n + 1) if j != i]) for i, inputs in self.stage_two]
        ok = (all(list(inputs) == sorted(set(inputs)) and set(inputs) <= set(within)
                  for inputs, within in allowed)
              and all(inputs for inputs in self.stage_one)
              and len(set(updated)) == len(updated) and set(updated) <= set(range(1, n + 1))
              and all(s in (1, 2) and 0 <= j <= n for s, j in self.block + self.transit))
        if not ok:
            raise ValueError(f"a wiring of {n} layers reads or passes on a feature it cannot: "
                             f"{self}; allowed: the rules of the Wiring docstring")


def _clique(n: int, stage_two_layers, block_stage: int, transit_stage: int) -> Wiring:
    """CliqueNet's block (section 3, Fig. 2): Stage I, eq. 1, layer i reads X0 and every
    layer before it; Stage II, eq. 2, updates `stage_two_layers` in order, each from every
    layer but itself and not X0. The head gets X0 and the layers after `block_stage`, the next
    block the layers after `transit_stage` (the CliqueNet README's Tab. 1 and 2)."""
    layers = range(1, n + 1)
    return Wiring(
        stage_one=tuple(tuple(range(i)) for i in layers),
        stage_two=tuple((i, tuple(j for j in layers if j != i)) for i in stage_two_layers),
        block=((1, 0), *((block_stage, j) for j in layers)),
        transit=tuple((transit_stage, j) for j in layers), every_kernel=True)


def _variant_x(n: int, x: int) -> Wiring:
    """Variant X (the CliqueNet README's Tab. 2): only layers 1..x get a Stage-II update; X = 0
    is I+I, X = n is II+II."""
    if not 0 <= x <= n:
        raise ValueError(f"x={x!r} is out of range; allowed: 0 <= x <= {n} (the block's layers)")
    return _clique(n, range(1, x + 1), 2, 2)


# A variant: (num_layers, x) -> Wiring; it raises ValueError naming x where x does not fit.
VARIANTS: dict[str, Callable[[int, int], Wiring]] = {
    "II+II": lambda n, x: _clique(n, range(1, n + 1), 2, 2),
    "I+I": lambda n, x: _clique(n, (), 1, 1),
    "I+II": lambda n, x: _clique(n, range(1, n + 1), 1, 2),
    "X": _variant_x,
}


def check_wiring(variant: str, x: int, num_layers: int, origin: str | None = None) -> None:
    """One-line ValueError naming `model.variant` / `model.x` / the setting `origin` that gave
    `num_layers` (e.g. "model.T=6"), where the variant cannot wire such a block."""
    if variant not in VARIANTS:
        raise ValueError(f"model.variant={variant!r} is not one of: {', '.join(VARIANTS)}")
    try:
        wiring = VARIANTS[variant](num_layers, x)
    except ValueError as error:  # the variant's own bound on x
        raise ValueError(f"model.{error}") from None
    if not all(inputs for _, inputs in wiring.stage_two):
        layers = f"{num_layers} layer{'s' * (num_layers != 1)}"
        raise ValueError(f"{origin or 'num_layers'} gives {layers} per block, which has no "
                         f"Stage-II inputs in variant {variant}; allowed: more layers per "
                         f"block, or variant I+I")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Static description of one clique block."""

    in_channels: int  # c0
    channels: int  # k
    num_layers: int  # n
    variant: str = "II+II"  # a key of VARIANTS
    x: int = 0  # the variant's argument (variant X: layers 1..x get a Stage-II update)
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

    @functools.cached_property
    def wiring(self) -> Wiring:
        return VARIANTS[self.variant](self.num_layers, self.x)

    def piece_channels(self, j: int) -> int:
        return self.in_channels if j == 0 else self.channels

    def width(self, inputs) -> int:
        """The channels of the concatenation of features `inputs`."""
        return sum(self.piece_channels(j) for j in inputs)

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
    """Every parameter of the block: name -> ("kernel", shape) or ("bn", channels). The clique
    kernels are those the stages read (or all, `Wiring.every_kernel`, where the stages share
    them); a BN spans its layer's inputs."""
    n, k, ks, wiring = spec.num_layers, spec.channels, spec.kernel_size, spec.wiring
    kernel = lambda j: ("kernel", (ks, ks, spec.piece_channels(j), k))
    layout: dict[str, tuple] = {}
    every_kernel = wiring.every_kernel and spec.stage_two_kernels == "shared"
    for i, inputs in enumerate(wiring.stage_one, 1):  # Stage II's are added with its BNs
        for j in range(n + 1) if every_kernel else inputs:
            if j != i:
                layout[kernel_name(j, i)] = kernel(j)
    for i, inputs in enumerate(wiring.stage_one, 1):
        layout[bn_name(1, i)] = ("bn", spec.width(inputs))
        if spec.bottleneck:
            layout[bottleneck_kernel(i)] = ("kernel", (3, 3, k, k))
            layout[bn_name(1, i, True)] = ("bn", k)
    for i, inputs in wiring.stage_two:
        layout[bn_name(2, i)] = ("bn", spec.width(inputs))
        if spec.bottleneck:
            layout[bn_name(2, i, True)] = ("bn", k)
        for j in inputs:
            layout.setdefault(spec.clique_name(2, j, i), kernel(j))
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


def _update_unrolled(params, stats, stage, i, inputs, features, seed, train, spec):
    """Layer i of `stage` from `features[j]`, j in `inputs`; writes new BN stats into `stats`."""
    name, b_name = bn_name(stage, i), bn_name(stage, i, True)
    bott = ((params[b_name], stats[b_name], params[spec.bottleneck_name(stage, i)])
            if spec.bottleneck else None)
    layer = _remat_if(_layer_policy(spec), _concat_layer, train=train, spec=spec)
    y, stats[name], new_b = layer([features[j] for j in inputs],
                                  [params[spec.clique_name(stage, j, i)] for j in inputs],
                                  (params[name], stats[name]), bott,
                                  spec.ops.fold_in(seed, stage, i))
    if spec.bottleneck:
        stats[b_name] = new_b
    return y


def _updates(spec: BlockSpec, stage: int):
    """[(layer i, the features it reads)] of `stage`, in order."""
    return list(enumerate(spec.wiring.stage_one, 1)) if stage == 1 else spec.wiring.stage_two


def stage_unrolled(params, stats, features, stage, seed, train, spec: BlockSpec):
    """Stage I (eq. 1) or II (eq. 2, CliqueNet's alternate update) on [X0, X1..Xn] (None: not
    computed yet): the wiring's updates, in order, in place. Returns (features, stats)."""
    stats, features = dict(stats), list(features)
    for i, inputs in _updates(spec, stage):
        features[i] = _update_unrolled(params, stats, stage, i, inputs, features, seed, train,
                                       spec)
    return features, stats


# ----------------------------------------------------------------------------- lax loop


def _spread(pieces: dict, sources, spec: BlockSpec, fill: float, axis: int = 0):
    """The `pieces` {feature j: array over its channels} along `axis` over the channels of the
    whole buffer `sources`, `fill` where a feature has no piece."""
    like = next(iter(pieces.values()))

    def filled(j):
        shape = list(like.shape)
        shape[axis] = spec.piece_channels(j)
        return jnp.full(shape, fill, like.dtype)
    return jnp.concatenate([pieces[j] if j in pieces else filled(j) for j in sources], axis)


def _split(a, inputs, spec: BlockSpec) -> dict:
    """A vector over the concatenation of `inputs` as {feature j: its channels}."""
    cuts = list(itertools.accumulate(spec.piece_channels(j) for j in inputs))[:-1]
    return dict(zip(inputs, jnp.split(a, cuts), strict=True))


def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _take(tree, idx):
    return jax.tree.map(lambda a: a[idx], tree)


def _put(tree, idx, values):
    return jax.tree.map(lambda a, v: a.at[idx].set(v), tree, values)


def stage_loop(params, stats, features, stage, seed, train, spec: BlockSpec):
    """`stage_unrolled` as a `fori_loop` over a buffer [X1..Xn], or [X0, X1..Xn] where an
    update reads X0, zeros for the features not computed yet (module docstring): zero kernel
    rows and zero BN scale and bias on the channels an update does not read; layer i writes
    its own channels."""
    updates, n, k = _updates(spec, stage), spec.num_layers, spec.channels
    if not updates:
        return list(features), dict(stats)
    first = 0 if any(0 in inputs for _, inputs in updates) else 1
    zeros = jnp.zeros(features[0].shape[:3] + (k,), features[0].dtype)
    buffer = jnp.concatenate([zeros if f is None else f for f in features[first:]], axis=-1)
    sources = range(first, n + 1)
    widths = itertools.accumulate((spec.piece_channels(j) for j in sources), initial=0)
    starts = dict(zip(range(first, n + 2), widths, strict=True))  # and the buffer's end
    layers = [i for i, _ in updates]
    weights = jnp.stack([
        _spread({j: params[spec.clique_name(stage, j, i)] for j in inputs}, sources, spec, 0, 2)
        for i, inputs in updates
    ])
    fills = {SCALE: 0.0, BIAS: 0.0, MEAN: 0.0, VAR: 1.0}
    pad = lambda tree, inputs: {key: _spread(_split(v, inputs, spec), sources, spec, fills[key])
                                for key, v in tree.items()}
    names = [bn_name(stage, i) for i in layers]
    bn_p = _stack([pad(params[m], inputs) for m, (_, inputs) in zip(names, updates, strict=True)])
    bn_s = _stack([pad(stats[m], inputs) for m, (_, inputs) in zip(names, updates, strict=True)])
    b_names = [bn_name(stage, i, True) for i in layers] if spec.bottleneck else []
    b_p = _stack([params[m] for m in b_names] or [{}])
    b_s = _stack([stats[m] for m in b_names] or [{}])
    b_k = (jnp.stack([params[spec.bottleneck_name(stage, i)] for i in layers])
           if spec.bottleneck else None)
    layer_at, write_at = jnp.asarray(layers), jnp.asarray([starts[i] for i in layers])

    def body(idx, carry):
        buffer, bn_s, b_s = carry
        bott = (_take(b_p, idx), _take(b_s, idx), b_k[idx]) if spec.bottleneck else None
        y, new_bn, new_b = _layer(buffer, weights[idx], (_take(bn_p, idx), _take(bn_s, idx)),
                                  bott, spec.ops.fold_in(seed, stage, layer_at[idx]), train, spec)
        buffer = jax.lax.dynamic_update_slice_in_dim(buffer, y, write_at[idx], axis=3)
        b_s = _put(b_s, idx, new_b) if spec.bottleneck else b_s
        return buffer, _put(bn_s, idx, new_bn), b_s

    policy = _layer_policy(spec)
    if policy is not None:  # prevent_cse=False is safe (and faster) inside a loop
        body = jax.checkpoint(body, prevent_cse=False, policy=policy)
    buffer, bn_s, b_s = jax.lax.fori_loop(0, len(layers), body, (buffer, bn_s, b_s))
    stats = dict(stats)
    for idx, (name, (_, inputs)) in enumerate(zip(names, updates, strict=True)):
        stats[name] = {key: jnp.concatenate([v[idx, starts[j] : starts[j + 1]] for j in inputs])
                       for key, v in bn_s.items()}
    for idx, name in enumerate(b_names):
        stats[name] = _take(b_s, idx)
    at = buffer.shape[-1] - n * k
    return [features[0], *(buffer[..., at + m * k : at + (m + 1) * k] for m in range(n))], stats


# ----------------------------------------------------------------------------- the block


def clique_block(params, stats, x0, rng, train: bool, spec: BlockSpec):
    """Runs one block. Returns (block_feature, transit_feature, new_stats) per the variant's
    wiring (block feature -> head, transit feature -> next block)."""
    block_policy = ops.REMAT_SAVED if spec.remat == "block" else None
    block = _remat_if(block_policy, _block, train=train, spec=spec)
    return block(params, stats, x0, spec.ops.fold_in(rng))


def _block(params, stats, x0, seed, train: bool, spec: BlockSpec):
    stage = stage_unrolled if spec.unroll else stage_loop
    first, stats = stage(params, stats, [x0] + [None] * spec.num_layers, 1, seed, train, spec)
    second, stats = stage(params, stats, first, 2, seed, train, spec)
    after = {1: first, 2: second}
    join = lambda refs: jnp.concatenate([after[s][j] for s, j in refs], -1)
    return join(spec.wiring.block), join(spec.wiring.transit), stats
