"""Stride-1 convolution written as matrix products, for bfloat16 on XLA:CPU.

XLA's CPU backend runs a bfloat16 `conv_general_dilated` in float32, but a bfloat16 `dot`
with a float32 result runs on the AMX units (YNNPACK), several times faster than float32.
`conv2d_matmul` writes a convolution and both of its gradients (a `custom_vjp`) as such dots.

Layout ("grid"): each image gets zero separator rows and columns on its bottom and right,
and the batch is flattened into one matrix of pixel rows (pixels, channels). Kernel tap
(i, j) then reads every output pixel's input at one constant row offset, so each tap's
operand is a contiguous row slice, and the separators supply the zero padding. Outputs are
computed at every grid position; `_from_rows` drops the junk at the separators, so its
cotangent is zero there, which the backward pass relies on.

Forward, two ways to sum over the T taps (`FORWARD_PATCHES` picks one per shape):
- taps: one dot of the input with all taps side by side (Cin, T*Cout), then the sum of T
  row-shifted column blocks of the float32 result. Cheap when Cout is small (CliqueNet).
- patches: im2col, the T shifted row slices side by side (pixels, T*Cin), then one dot.
Backward: the patches of the output gradient G (pixels, T*Cout) give both gradients,
dx = G @ (flipped, transposed kernel) and dkernel = x.T @ G.

Where XLA's CPU backend needs steering (each checked in tests/cpu/test_conv.py by the HLO):
- a transposed operand must be materialised in row-major order (`_transpose`), or the dot
  is not given to YNNPACK and silently runs in float32;
- pads, slices and concatenations run on 16-bit integer views (`_bit_view`): in bfloat16
  they are converted to float32 and back;
- the padded input is kept in a buffer of its own (`_materialised`): fused into the
  transpose that the kernel gradient needs, its pads make that transpose much slower.

Products are accumulated in float32; results are returned in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Grid:
    """Static geometry of one convolution on the flattened grid of pixels."""

    batch: int
    in_size: tuple[int, int]  # (H, W)
    out_size: tuple[int, int]  # (Ho, Wo)
    period: tuple[int, int]  # (Hp, Wp): an image plus its separator rows / columns
    kernel_size: tuple[int, int]
    low_pads: tuple[int, int]

    @property
    def offsets(self) -> tuple[int, ...]:
        """Row offset of each tap (row-major over the kernel) from its output pixel."""
        (kh, kw), (lo_h, lo_w), wp = self.kernel_size, self.low_pads, self.period[1]
        return tuple((i - lo_h) * wp + (j - lo_w) for i in range(kh) for j in range(kw))

    @property
    def rows(self) -> int:
        return self.batch * self.period[0] * self.period[1]

    @property
    def front(self) -> int:
        return max(0, -min(self.offsets))

    @property
    def back(self) -> int:
        return max(0, max(self.offsets))

    @property
    def pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.out_size == self.in_size


def make_grid(x_shape, kernel_shape, padding) -> Grid:
    n, h, w, _ = x_shape
    kh, kw = kernel_shape[:2]
    if isinstance(padding, str):
        pads = lax.padtype_to_pads((h, w), (kh, kw), (1, 1), padding)
    else:
        pads = [tuple(p) for p in padding]
    if any(p < 0 for pair in pads for p in pair):
        raise ValueError(f"negative padding is not supported: {pads}")
    sizes = zip((h, w), pads, (kh, kw), strict=True)
    out_size = tuple(s + lo + hi - k + 1 for s, (lo, hi), k in sizes)
    # Separators must hold the padding on either side and leave room for every output.
    separators = zip((h, w), pads, out_size, strict=True)
    period = tuple(s + max(lo, hi, o - s) for s, (lo, hi), o in separators)
    return Grid(n, (h, w), out_size, period, (kh, kw), (pads[0][0], pads[1][0]))


def _bit_view(fn):
    """Runs a data-movement function on an unsigned-integer view of its first argument."""

    @functools.wraps(fn)
    def moved(array, *args):
        bits = jnp.uint16 if array.dtype.itemsize == 2 else jnp.uint32
        out = fn(lax.bitcast_convert_type(array, bits), *args)
        return lax.bitcast_convert_type(out, array.dtype)

    return moved


@_bit_view
def _to_rows(a, grid: Grid, front: int, back: int):
    """(N, h, w, C) -> grid rows (zero at the separators) with `front`/`back` zero rows."""
    (h, w), (hp, wp) = a.shape[1:3], grid.period
    a = jnp.pad(a, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    return jnp.pad(a.reshape(grid.rows, a.shape[-1]), ((front, back), (0, 0)))


def _from_rows(rows, grid: Grid, front: int, size):
    """Grid rows (after `front` extra rows) -> (N, *size, C), without the separators."""
    (hp, wp), channels = grid.period, rows.shape[-1]
    rows = lax.slice_in_dim(rows, front, front + grid.rows)
    return rows.reshape(grid.batch, hp, wp, channels)[:, : size[0], : size[1]]


def _transpose(a):
    """a.T, materialised in row-major order. A bare transpose is folded into the dot's
    dimension numbers, and the CPU backend then runs the dot in float32 instead of on
    YNNPACK; a transpose seen through a 3-D reshape keeps its own row-major buffer."""
    rows, cols = a.shape
    return a.reshape(rows, 1, cols).transpose(2, 1, 0).reshape(cols, rows)


def _materialised(a):
    """`a` in a buffer of its own, not recomputed inside its consumers' fusions: a transpose
    fused with a bitcast or pad runs much slower on XLA's CPU backend. Fusion does not cross
    a conditional; the predicate is always true but XLA cannot know it."""
    bits = lax.bitcast_convert_type(a.reshape(-1)[0], jnp.uint16 if a.dtype.itemsize == 2
                                    else jnp.uint32)
    return lax.cond((bits | 1) != 0, lambda v: v, jnp.zeros_like, a)


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=F32)


@_bit_view
def _patches(src, start: int, offsets, rows: int):
    """im2col: (L, C) -> (rows, T*C), block t of row r being src[start + r + offsets[t]]."""
    return jnp.concatenate(
        [lax.slice_in_dim(src, start + o, start + o + rows) for o in offsets], axis=1)


def _tap_sum(src, taps, start: int, offsets, rows: int):
    """sum_t src[start + r + offsets[t]] @ taps[t] for r < rows, as (rows, Cout) float32:
    one dot against all taps side by side, then a sum of shifted column blocks."""
    count, cin, cout = taps.shape
    z = _dot(src, jnp.transpose(taps, (1, 0, 2)).reshape(cin, count * cout))
    blocks = [
        lax.slice(z, (start + o, t * cout), (start + o + rows, (t + 1) * cout))
        for t, o in enumerate(offsets)
    ]
    return functools.reduce(jnp.add, blocks)


def forward_patches(cin: int, cout: int) -> bool:
    """Whether the forward pass uses patches rather than taps (see bench_conv.py)."""
    return cout >= 2 * cin


def matmul_pays(kernel_shape) -> bool:
    """Whether `conv2d_matmul` beats XLA's convolution for this kernel (bench_conv.py): not
    for very few input channels (an RGB stem), whose products are too thin."""
    return kernel_shape[2] >= 16


FORWARD_PATCHES = forward_patches  # replaceable, for benchmarking the alternatives


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, taps, grid: Grid):
    return _conv_fwd(x, taps, grid)[0]


def _conv_fwd(x, taps, grid: Grid):
    xg = _materialised(_to_rows(x, grid, grid.front, grid.back))
    count, cin, cout = taps.shape
    if FORWARD_PATCHES(cin, cout):
        patches = _patches(xg, grid.front, grid.offsets, grid.rows)
        y = _dot(patches, taps.reshape(count * cin, cout))
    else:
        y = _tap_sum(xg, taps, grid.front, grid.offsets, grid.rows)
    return _from_rows(y, grid, 0, grid.out_size).astype(x.dtype), (xg, taps)


def _conv_bwd(grid: Grid, residuals, dy):
    xg, taps = residuals
    count, cin, cout = taps.shape
    # dxg[q] = sum_t dy[q - front - offsets[t]] @ taps[t].T, over every row q of xg: the
    # patches of dy (padded by `margin` rows so that every shifted read is in bounds) with
    # negated offsets. The same patches give dtaps[t] = sum_q xg[q].T (block t of row q).
    margin = grid.front + grid.back
    dy_rows = _to_rows(dy, grid, margin, margin)
    flipped = tuple(-o for o in grid.offsets)
    patches = _patches(dy_rows, margin - grid.front, flipped, xg.shape[0])
    dxg = _dot(patches, jnp.swapaxes(taps, 1, 2).reshape(count * cout, cin))
    dx = _from_rows(dxg, grid, grid.front, grid.in_size).astype(xg.dtype)
    dtaps = _dot(_transpose(xg), patches).reshape(cin, count, cout)
    return dx, jnp.swapaxes(dtaps, 0, 1).astype(taps.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


@jax.custom_vjp
def _pointwise(x, kernel):
    """1x1 convolution of (pixels, Cin) rows with a (Cin, Cout) kernel."""
    return _dot(x, kernel).astype(x.dtype)


def _pointwise_fwd(x, kernel):
    x = _materialised(x)
    return _pointwise(x, kernel), (x, kernel)


def _pointwise_bwd(residuals, dy):
    x, kernel = residuals
    dx = _dot(dy, _transpose(kernel)).astype(x.dtype)
    return dx, _dot(_transpose(x), dy).astype(kernel.dtype)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def conv2d_matmul(x, kernel, padding="SAME", compute_dtype=jnp.bfloat16):
    """Stride-1 NHWC x HWIO convolution written as dots (forward and backward).

    `padding` is "SAME", "VALID" or ((lo, hi), (lo, hi)) with non-negative pads. Both
    operands are cast to `compute_dtype`; products are accumulated in float32 and the result
    is returned in `compute_dtype`.
    """
    x, kernel = x.astype(compute_dtype), kernel.astype(compute_dtype)
    grid = make_grid(x.shape, kernel.shape, padding)
    if grid.pointwise:
        rows = x.reshape(-1, x.shape[-1])
        return _pointwise(rows, kernel[0, 0]).reshape(*x.shape[:3], kernel.shape[-1])
    return _conv(x, kernel.reshape(-1, *kernel.shape[2:]), grid)


# ----------------------------------------------------------------------------- float32 1x1


def _xla_pointwise(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def pointwise_conv(x, kernel):
    """A 1x1, stride-1 NHWC x HWIO convolution in the input's dtype: XLA's convolution
    forward and for the input gradient, but the kernel gradient as one dot over all pixels,
    x(pixels, Cin)^T dy(pixels, Cout), which needs no transposed copy of the activations.
    XLA:CPU's own kernel gradient transposes them channel-major first, which made the
    training steps of the models with many 1x1 convolutions (CliqueNet-S0, MBCliqueNet)
    measurably slower (benchmarks/README.md)."""
    return _xla_pointwise(x, kernel)


def _pointwise_conv_fwd(x, kernel):
    return _xla_pointwise(x, kernel), (x, kernel)


def _pointwise_conv_bwd(residuals, dy):
    x, kernel = residuals
    dx = jax.vjp(lambda x: _xla_pointwise(x, kernel), x)[1](dy)[0]
    rows = lambda a: a.reshape(-1, a.shape[-1])
    dkernel = lax.dot_general(rows(x), rows(dy), (((0,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
    return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)


pointwise_conv.defvjp(_pointwise_conv_fwd, _pointwise_conv_bwd)
