"""Tests for cliquejax.binary: sign functions, modulation (docs/papers.md §3), init, packing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cliquejax import binary

SIGN_NAMES = ["ste_sign", "identity_ste", "approx_sign"]
BOUNDARY = [-1.0001, -1.0, -0.9999, 0.0, 0.9999, 1.0, 1.0001]


# --- sign functions ---------------------------------------------------------------------


@pytest.mark.parametrize("name", SIGN_NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sign_forward_values_and_dtype(name, dtype):
    sign = binary.get_sign_function(name)
    w = jnp.array([-2, -1, -0.5, 0, 0.5, 1, 2], dtype)
    out = sign(w)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), [-1, -1, -1, 1, 1, 1, 1])


def test_sign_of_negative_zero_is_plus_one():
    assert float(binary.ste_sign(jnp.float32(-0.0))) == 1.0


def _sign_grad(sign, w, g):
    return jax.grad(lambda w: jnp.sum(g * sign(w)))(w)


def test_ste_gradient_is_clipped_at_one_inclusive():
    w = jnp.array(BOUNDARY, jnp.float32)
    g = jnp.array([0.3, -1.7, 2.5, 4.0, -0.25, 1.5, 9.0], jnp.float32)
    expected = np.array([0.0, -1.7, 2.5, 4.0, -0.25, 1.5, 0.0], np.float32)
    np.testing.assert_array_equal(_sign_grad(binary.ste_sign, w, g), expected)


def test_identity_ste_gradient_passes_everywhere():
    w = jnp.array([-50.0, *BOUNDARY, 50.0], jnp.float32)
    g = jnp.arange(1, w.size + 1, dtype=jnp.float32)
    np.testing.assert_array_equal(_sign_grad(binary.identity_ste, w, g), g)


def test_approx_sign_gradient_matches_hand_values():
    w = jnp.array([-2.0, -1.0001, -1.0, -0.75, -0.5, 0.0, 0.25, 0.5, 1.0, 1.0001], jnp.float32)
    g = jnp.full(w.shape, 2.0, jnp.float32)
    # 2 - 2|w| inside |w| <= 1, times g = 2
    expected = 2.0 * np.array([0, 0, 0, 0.5, 1.0, 2.0, 1.5, 1.0, 0, 0], np.float32)
    np.testing.assert_allclose(_sign_grad(binary.approx_sign, w, g), expected, atol=1e-6)


@pytest.mark.parametrize("name", SIGN_NAMES)
def test_sign_gradient_keeps_bfloat16(name):
    w = jnp.array([-0.5, 0.5, 2.0], jnp.bfloat16)
    grad = jax.grad(lambda w: jnp.sum(binary.get_sign_function(name)(w).astype(jnp.float32)))(w)
    assert grad.dtype == jnp.bfloat16


def test_sign_functions_work_under_jit():
    w = jnp.array([-2.0, 0.0, 0.5], jnp.float32)
    grad = jax.jit(jax.grad(lambda w: jnp.sum(binary.ste_sign(w))))(w)
    np.testing.assert_array_equal(grad, [0.0, 1.0, 1.0])


def test_get_sign_function_rejects_unknown_name():
    with pytest.raises(ValueError) as info:
        binary.get_sign_function("nope")
    message = str(info.value)
    assert "'nope'" in message
    assert "\n" not in message
    for name in SIGN_NAMES:
        assert name in message


def test_get_sign_function_known_names():
    assert binary.get_sign_function("ste_sign") is binary.ste_sign
    assert binary.get_sign_function("identity_ste") is binary.identity_ste
    assert binary.get_sign_function("approx_sign") is binary.approx_sign


# --- modulation ---------------------------------------------------------------------------


def _random_problem(seed, size=3, in_channels=5, n_binary=3, n_planes=4):
    keys = jax.random.split(jax.random.key(seed), 3)
    # latent values spread over [-2, 2] so that the STE clip matters
    latent = jax.random.uniform(keys[0], (size, size, in_channels, n_binary), minval=-2, maxval=2)
    m_filter = jax.random.normal(keys[1], (n_planes, size, size))
    return latent, m_filter, keys[2]


def test_modulate_shape_and_channel_order_against_loop():
    latent, m_filter, _ = _random_problem(0)
    kernel = np.asarray(latent)
    planes = np.asarray(m_filter)
    q = np.asarray(binary.modulate(latent, m_filter))
    n_planes = planes.shape[0]
    assert q.shape == (3, 3, 5, 3 * n_planes)
    for i in range(kernel.shape[3]):
        for j in range(n_planes):
            for c in range(kernel.shape[2]):
                expected = kernel[:, :, c, i] * planes[j]
                np.testing.assert_allclose(q[:, :, c, i * n_planes + j], expected, rtol=1e-6)


def test_modulate_rejects_mismatched_spatial_size():
    with pytest.raises(ValueError):
        binary.modulate(jnp.ones((3, 3, 2, 2)), jnp.ones((4, 5, 5)))


def reconstructed_filters(latent, m_filter):
    """Q = sign(C) modulated by M (eq. 3): the filters a modulated binary conv uses."""
    return binary.modulate(binary.ste_sign(latent), m_filter)


def test_reconstructed_filters_use_signs_and_jit():
    latent, m_filter, _ = _random_problem(1)
    q = jax.jit(reconstructed_filters)(latent, m_filter)
    signs = np.where(np.asarray(latent) >= 0, 1.0, -1.0)
    np.testing.assert_allclose(q, binary.modulate(jnp.asarray(signs), m_filter), rtol=1e-6)
    plane = np.abs(np.asarray(m_filter)[1])[:, :, None]
    np.testing.assert_allclose(np.abs(q[..., 1]), np.broadcast_to(plane, (3, 3, 5)))


def _eq6_eq7(grad_q, latent, m_filter):
    """Hand-derived docs/papers.md §3 / paper eqs. 6-7, written with explicit loops."""
    grad_q, latent, planes = (np.asarray(a, np.float64) for a in (grad_q, latent, m_filter))
    n_binary, n_planes = latent.shape[3], planes.shape[0]
    signs = np.where(latent >= 0, 1.0, -1.0)
    mask = (np.abs(latent) <= 1).astype(np.float64)
    grad_c = np.zeros_like(latent)
    grad_m = np.zeros_like(planes)
    for i in range(n_binary):
        for j in range(n_planes):
            g_ij = grad_q[:, :, :, i * n_planes + j]  # (w, w, I)
            grad_c[:, :, :, i] += g_ij * planes[j][:, :, None]
            grad_m[j] += np.sum(g_ij * signs[:, :, :, i], axis=2)
    return mask * grad_c, grad_m


def test_modulation_gradients_match_eq6_eq7():
    latent, m_filter, key = _random_problem(2)
    g = jax.random.normal(key, (3, 3, 5, 12))

    def loss(latent, m_filter):
        return jnp.sum(g * reconstructed_filters(latent, m_filter))

    grad_c, grad_m = jax.grad(loss, argnums=(0, 1))(latent, m_filter)
    expected_c, expected_m = _eq6_eq7(g, latent, m_filter)
    assert 0 < np.mean(expected_c == 0) < 1  # some latents are clipped, some are not
    np.testing.assert_allclose(grad_c, expected_c, atol=1e-5)
    np.testing.assert_allclose(grad_m, expected_m, atol=1e-5)


def _conv(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def test_modulation_gradients_through_convolution():
    latent, m_filter, key = _random_problem(3, in_channels=4, n_binary=2)
    x_key, r_key = jax.random.split(key)
    x = jax.random.normal(x_key, (2, 6, 6, 4))
    r = jax.random.normal(r_key, (2, 6, 6, 8))

    def conv_loss(q):
        return jnp.sum(r * _conv(x, q))

    q = reconstructed_filters(latent, m_filter)
    grad_q = jax.grad(conv_loss)(q)
    expected_c, expected_m = _eq6_eq7(grad_q, latent, m_filter)

    def loss(latent, m_filter):
        return conv_loss(reconstructed_filters(latent, m_filter))

    grad_c, grad_m = jax.grad(loss, argnums=(0, 1))(latent, m_filter)
    np.testing.assert_allclose(grad_c, expected_c, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(grad_m, expected_m, atol=1e-4, rtol=1e-5)


# --- initialisation ---------------------------------------------------------------------


def test_he_normal_is_flax_compatible_and_has_requested_std():
    init = binary.he_normal_fan_in(50)
    values = init(jax.random.key(0), (200, 100))
    assert values.dtype == jnp.float32
    assert init(jax.random.key(0), (3,), jnp.bfloat16).dtype == jnp.bfloat16
    assert abs(float(jnp.std(values)) / math.sqrt(2 / 50) - 1) < 0.03
    assert abs(float(jnp.mean(values))) < 0.01
    with pytest.raises(ValueError):
        binary.he_normal_fan_in(0)


def test_binary_kernel_init_reads_fan_in_from_shape():
    kernel = binary.binary_kernel_init(jax.random.key(1), (3, 3, 64, 16))
    assert abs(float(jnp.std(kernel)) / math.sqrt(2 / (3 * 3 * 64)) - 1) < 0.05
    signs = binary.ste_sign(kernel)
    assert abs(float(jnp.mean(signs))) < 0.05
    assert abs(float(jnp.std(signs)) - 1) < 0.01


def test_reconstructed_filters_match_he_std_at_init():
    size, width, n_planes = 3, 64, 4
    fan_in = binary.unified_fan_in(size, width)
    assert fan_in == 3 * 3 * 64
    latent_init = binary.he_normal_fan_in(fan_in)  # the latent C
    m_init = binary.m_filter_init(fan_in)

    def one_draw(key):
        c_key, m_key = jax.random.split(key)
        latent = latent_init(c_key, (size, size, width, width // n_planes))
        return reconstructed_filters(latent, m_init(m_key, (n_planes, size, size)))

    # one M-filter holds only K*w*w = 36 values, so pool independent blocks for the std
    q = jax.vmap(one_draw)(jax.random.split(jax.random.key(2), 32))
    assert q.shape == (32, size, size, width, width)
    assert abs(float(jnp.std(q)) / math.sqrt(2 / fan_in) - 1) < 0.10
    # and within one block, std(Q) is the root mean square of that block's M-filter
    m_filter = m_init(jax.random.key(3), (n_planes, size, size))
    latent = latent_init(jax.random.key(4), (size, size, width, width // n_planes))
    q_one = reconstructed_filters(latent, m_filter)
    rms_m = float(jnp.sqrt(jnp.mean(m_filter**2)))
    assert abs(float(jnp.sqrt(jnp.mean(q_one**2))) - rms_m) < 1e-6


# --- bit packing --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (1,), (7,), (8,), (13, 17), (3, 3, 5, 7), (2, 3, 64, 16)])
def test_pack_unpack_round_trip(shape):
    rng = np.random.default_rng(sum(shape) + len(shape))
    kernel = rng.normal(size=shape).astype(np.float32)
    kernel.reshape(-1)[::3] = 0.0  # zeros store as +1
    packed, stored_shape = binary.pack_signs(jnp.asarray(kernel))
    assert stored_shape == shape
    assert packed.dtype == np.uint8
    assert packed.size == binary.packed_nbytes(shape) == math.ceil(math.prod(shape) / 8)
    unpacked = binary.unpack_signs(packed, stored_shape)
    assert unpacked.dtype == np.float32 and unpacked.shape == shape
    np.testing.assert_array_equal(unpacked, np.where(kernel >= 0, 1.0, -1.0))
    np.testing.assert_array_equal(unpacked, np.asarray(binary.ste_sign(jnp.asarray(kernel))))


def test_pack_bit_layout_and_size_check():
    packed, shape = binary.pack_signs(np.array([1.0, -1.0, 0.0, -0.5, 2.0, -3.0, 4.0, -5.0, 6.0]))
    np.testing.assert_array_equal(packed, [0b10101010, 0b10000000])
    assert binary.unpack_signs(packed, shape, dtype=np.int8).dtype == np.int8
    with pytest.raises(ValueError):
        binary.unpack_signs(packed[:1], shape)


# --- flip ratio -------------------------------------------------------------------------


def test_flip_ratio_exact_fraction():
    old = jnp.array([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0, -2.0, 3.0])
    new = jnp.array([1.0, -0.4, -0.1, 0.6, -1.0, 2.0, -2.0, 0.0])  # flips at 0, 2, 4
    ratio = binary.flip_ratio(old, new)
    assert ratio.dtype == jnp.float32
    assert float(ratio) == 3 / 8
    assert float(jax.jit(binary.flip_ratio)(old, new)) == 3 / 8


def test_flip_ratio_pytree_and_identical():
    old = {"a": jnp.ones((2, 3)), "b": [jnp.full((4,), -1.0)]}
    new = {"a": jnp.ones((2, 3)).at[0, 0].set(-1.0), "b": [jnp.array([1.0, 1.0, -1.0, -1.0])]}
    assert binary.flip_ratio(old, new) == np.float32(3 / 10)
    assert float(binary.flip_ratio(old, old)) == 0.0
    with pytest.raises(ValueError):
        binary.flip_ratio({"a": jnp.ones(2)}, {"b": jnp.ones(2)})
