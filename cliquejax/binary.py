"""Binarisation and modulation for MBCliqueNet (MBCliqueNet sections 2.1-2.2), as pure
functions.

Kernels use Flax's HWIO layout `(w, w, in_channels, out_channels)`. A modulated conv with
`width` outputs keeps `width // K` latent filters C_i; the block's M-filter has shape
`(K, w, w)`; `modulate` rebuilds the `width` filters Q used by the convolution.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------------------------
# Sign functions: forward sign(w) = +1 for w >= 0 and -1 otherwise (never 0), each with
# its own backward rule.


def _hard_sign(w):
    return jnp.where(w >= 0, 1, -1).astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def ste_sign(w, clip_value: float | None = 1.0):
    """Sign with the straight-through estimator (as larq's `ste_sign`): the gradient passes
    where |w| <= clip_value, everywhere for clip_value=None."""
    return _hard_sign(w)


def _ste_sign_fwd(w, clip_value):
    return _hard_sign(w), w


def _ste_sign_bwd(clip_value, w, grad):
    if clip_value is None:
        return (grad,)
    return (grad * (jnp.abs(w) <= clip_value).astype(grad.dtype),)


ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)

identity_ste = functools.partial(ste_sign, clip_value=None)  # the unclipped STE


def approx_sign(w):
    """Sign with the ApproxSign gradient of Bi-Real Net: 2 - 2|w| inside |w| <= 1, else 0,
    the derivative of the polynomial 2w - w|w| there, passed straight through the sign
    (its forward value adds exactly zero)."""
    poly = jnp.where(jnp.abs(w) <= 1, 2 * w - w * jnp.abs(w), 0)
    return jax.lax.stop_gradient(_hard_sign(w)) + (poly - jax.lax.stop_gradient(poly))


SIGN_FUNCTIONS = {
    "ste_sign": ste_sign,
    "identity_ste": identity_ste,
    "approx_sign": approx_sign,
}


def get_sign_function(name: str, field: str = "model.sign_fn"):
    """The sign function called `name`; `field` names the config entry in the error."""
    if name not in SIGN_FUNCTIONS:
        allowed = ", ".join(sorted(SIGN_FUNCTIONS))
        raise ValueError(f"{field}={name!r} is not one of: {allowed}")
    return SIGN_FUNCTIONS[name]


# ---------------------------------------------------------------------------------------
# Modulation (MBCliqueNet section 2.1, eq. 3).


def modulate(binary_kernel, m_filter):
    """Reconstructed filters Q with Q[..., i*K + j] = binary_kernel[..., i] * m_filter[j].

    binary_kernel: (w, w, in_channels, width // K); m_filter: (K, w, w), each plane
    broadcast over the input channels. Returns (w, w, in_channels, width): the K filters
    rebuilt from binary filter i are the adjacent output channels i*K .. i*K + K - 1.
    """
    if binary_kernel.ndim != 4 or m_filter.ndim != 3:
        raise ValueError(
            f"modulate expects an HWIO kernel and a (K, w, w) M-filter, got shapes "
            f"{binary_kernel.shape} and {m_filter.shape}"
        )
    if binary_kernel.shape[:2] != m_filter.shape[1:]:
        raise ValueError(
            f"kernel spatial size {binary_kernel.shape[:2]} does not match the M-filter "
            f"planes {m_filter.shape[1:]}"
        )
    height, width_, in_channels, n_binary = binary_kernel.shape
    n_planes = m_filter.shape[0]
    planes_hw1k = jnp.transpose(m_filter, (1, 2, 0))[:, :, None, None, :]
    products = binary_kernel[..., None] * planes_hw1k  # (w, w, I, width // K, K)
    return products.reshape(height, width_, in_channels, n_binary * n_planes)


# ---------------------------------------------------------------------------------------
# Initialisation (MBCliqueNet section 2.2). Plain (untruncated) normals.
# Since |sign(C)| = 1, std(Q) = std(M); for Q to match He-initialised full-precision
# filters of the modulated conv (fan-in w*w*width), M gets std sqrt(2 / (w*w*width)),
# the block's unified fan-in. The latent std only sets how far C sits from the STE clip.


def he_normal_fan_in(fan_in: int):
    """Flax-style init `init(key, shape, dtype)` drawing N(0, std = sqrt(2 / fan_in))."""
    if fan_in <= 0:
        raise ValueError(f"fan_in must be positive, got {fan_in}")
    std = math.sqrt(2.0 / fan_in)

    def init(key, shape, dtype=jnp.float32):
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def binary_kernel_init(key, shape, dtype=jnp.float32):
    """Flax kernel_init for a latent HWIO kernel; the fan-in is read from `shape`."""
    return he_normal_fan_in(math.prod(shape[:-1]))(key, shape, dtype)


def unified_fan_in(kernel_size: int, width: int) -> int:
    """Fan-in shared by every modulated conv of a block: w * w * width."""
    return kernel_size * kernel_size * width


def m_filter_init(unified_fan_in: int):
    """Init for a block's M-filter (K, w, w), unified_fan_in = w * w * width."""
    return he_normal_fan_in(unified_fan_in)


# ---------------------------------------------------------------------------------------
# Deployment: one bit per weight, bit 1 for w >= 0 (same rule as the forward sign).


def packed_nbytes(shape) -> int:
    return (math.prod(shape) + 7) // 8


def pack_signs(kernel) -> tuple[np.ndarray, tuple[int, ...]]:
    """(packed uint8 bits of kernel >= 0, flattened in C order; the kernel shape)."""
    values = np.asarray(kernel)
    return np.packbits((values >= 0).ravel()), tuple(values.shape)


def unpack_signs(packed, shape, dtype=np.float32) -> np.ndarray:
    """The ±1 array of `shape` stored by `pack_signs`."""
    shape = tuple(shape)
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.size != packed_nbytes(shape):
        raise ValueError(
            f"{packed.size} packed bytes do not hold shape {shape} "
            f"({packed_nbytes(shape)} bytes expected)"
        )
    bits = np.unpackbits(packed, count=math.prod(shape))
    return np.where(bits == 1, 1, -1).astype(dtype).reshape(shape)


# ---------------------------------------------------------------------------------------
# Training diagnostics.


def flip_ratio(old_latent, new_latent):
    """Fraction of weights whose sign (>= 0 is +) differs; arrays or matching pytrees."""
    old_leaves, old_tree = jax.tree.flatten(old_latent)
    new_leaves, new_tree = jax.tree.flatten(new_latent)
    if old_tree != new_tree:
        raise ValueError(f"flip_ratio needs matching pytrees, got {old_tree} and {new_tree}")
    total = sum(math.prod(jnp.shape(leaf)) for leaf in old_leaves)
    if total == 0:
        raise ValueError("flip_ratio needs at least one weight")
    flips = sum(jnp.sum((old >= 0) != (new >= 0), dtype=jnp.int32)
                for old, new in zip(old_leaves, new_leaves, strict=True))
    return (flips / total).astype(jnp.float32)
