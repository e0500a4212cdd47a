"""The XLA:CPU convolutions (`cliquejax.cpu.conv`): `conv2d_matmul` (a convolution written
as matrix products, with its own backward pass) against `lax.conv_general_dilated`: outputs
and both gradients, float32 and bfloat16, and the compiled program really runs bfloat16 dots
(no silent float32 fallback); the CPU `conv2d` dispatch, while the reference `ops.conv2d`
stays one XLA convolution."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cliquejax import ops

conv = pytest.importorskip("cliquejax.cpu.conv")
cpu_ops = pytest.importorskip("cliquejax.cpu.ops")

CASES = [  # (batch, height, width, cin, cout, kernel, padding)
    (2, 8, 8, 6, 4, 3, "SAME"),
    (3, 5, 7, 5, 9, 3, "SAME"),  # odd sizes; cout >= 2 cin: patches forward
    (2, 5, 7, 4, 3, 3, "VALID"),
    (2, 6, 5, 7, 5, 1, "SAME"),  # 1x1: a plain matrix product
    (1, 9, 6, 3, 4, 5, "SAME"),
    (2, 4, 5, 3, 2, 2, "SAME"),  # even kernel: pads (0, 1)
    (1, 6, 6, 4, 4, 3, ((2, 0), (0, 2))),
    (2, 6, 6, 4, 5, 1, ((1, 1), (0, 1))),  # padded 1x1 goes through the grid
]


def reference(x, kernel, padding):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)


def operands(case, seed=0):
    n, h, w, cin, cout, k, padding = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, cin), np.float32)
    kernel = rng.standard_normal((k, k, cin, cout), np.float32) / np.sqrt(k * k * cin)
    out = jax.eval_shape(lambda a, b: reference(a, b, padding), x, kernel)
    return x, kernel, rng.standard_normal(out.shape, np.float32)


def value_and_grads(fn, x, kernel, cotangent):
    """fn(x, kernel) and the gradients of sum(fn * cotangent), all as float32, under jit."""
    def run(x, kernel):
        y, pullback = jax.vjp(fn, x, kernel)
        return (y, *pullback(cotangent.astype(y.dtype)))

    return [a.astype(jnp.float32) for a in jax.jit(run)(x, kernel)]


def relative_error(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("case", CASES)
def test_float32_equals_xla(case):
    x, kernel, cotangent = operands(case)
    padding = case[-1]
    got = value_and_grads(lambda a, b: conv.conv2d_matmul(a, b, padding, jnp.float32),
                          x, kernel, cotangent)
    want = value_and_grads(lambda a, b: reference(a, b, padding), x, kernel, cotangent)
    for name, g, w in zip(("y", "dx", "dkernel"), got, want, strict=True):
        assert g.shape == w.shape, name
        assert relative_error(g, w) < 1e-5, name


@pytest.mark.parametrize("case", CASES[:4])
def test_bfloat16_within_rounding(case):
    x, kernel, cotangent = operands(case, seed=1)
    padding = case[-1]
    bf16 = lambda a, b: conv.conv2d_matmul(a, b, padding, jnp.bfloat16)
    got = value_and_grads(bf16, x, kernel, cotangent)
    want = value_and_grads(lambda a, b: reference(a, b, padding), x, kernel, cotangent)
    assert got[0].dtype == jnp.float32 and jax.eval_shape(bf16, x, kernel).dtype == jnp.bfloat16
    for name, g, w in zip(("y", "dx", "dkernel"), got, want, strict=True):
        assert relative_error(g, w) < 2e-2, name


def test_cpu_conv2d_dispatch():
    """CPU kernels: bf16 stride 1 runs as dots; float32, strided and RGB-stem convolutions
    stay XLA's. The reference `ops.conv2d` is one XLA convolution in every case."""
    x, kernel, _ = operands((2, 8, 8, 16, 8, 3, "SAME"))

    def hlo(fn, x=x, kernel=kernel):
        return jax.jit(fn).lower(x, kernel).as_text()

    assert "convolution" not in hlo(lambda a, b: cpu_ops.conv2d(a, b, dtype=jnp.bfloat16))
    assert "convolution" in hlo(lambda a, b: cpu_ops.conv2d(a, b))
    assert "convolution" in hlo(lambda a, b: cpu_ops.conv2d(a, b, 2, "SAME", jnp.bfloat16))
    rgb = operands((2, 8, 8, 3, 8, 3, "SAME"))[:2]
    assert "convolution" in hlo(lambda a, b: cpu_ops.conv2d(a, b, dtype=jnp.bfloat16), *rgb)
    stock = hlo(lambda a, b: ops.conv2d(a, b, dtype=jnp.bfloat16))
    assert stock.count("convolution(") == 1 and " dot" not in stock
    y = cpu_ops.conv2d(x, kernel, dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 == ops.conv2d(x, kernel, dtype=jnp.bfloat16).dtype
    np.testing.assert_array_equal(cpu_ops.conv2d(x, kernel), reference(x, kernel, "SAME"))


def operand_types(hlo_text: str, line: str):
    """Element types of the operands of the instruction on `line` of compiled HLO."""
    names = re.search(r"dot\(([^)]*)\)", line).group(1).replace("%", "").split(", ")
    return [re.search(rf"%{re.escape(n)} = (\w+)\[", hlo_text).group(1) for n in names]


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]])
def test_compiled_dots_are_bfloat16(case):
    """Every product of the compiled forward + backward multiplies bfloat16 operands: a
    transposed operand that the CPU backend cannot hand to its bf16 kernels would make it
    convert the dot to float32 without a word."""
    x, kernel, cotangent = operands(case)
    padding = case[-1]

    def run(x, kernel):
        fn = lambda a, b: conv.conv2d_matmul(a, b, padding, jnp.bfloat16)
        y, pullback = jax.vjp(fn, x, kernel)
        return (y, *pullback(cotangent.astype(y.dtype)))

    text = jax.jit(run).lower(x, kernel).compile().as_text()
    dots = [line for line in text.splitlines() if " dot(" in line]
    assert len(dots) >= 3
    for line in dots:
        assert operand_types(text, line) == ["bf16", "bf16"], line


def test_rejects_negative_padding():
    x, kernel, _ = operands(CASES[0])
    with pytest.raises(ValueError, match="negative padding"):
        conv.conv2d_matmul(x, kernel, ((-1, 1), (1, 1)))


@pytest.mark.parametrize("shape", [(2, 6, 5, 7, 5), (3, 4, 4, 16, 3)])
def test_pointwise_conv_equals_xla(shape):
    """`conv.pointwise_conv` (float32 1x1: kernel gradient as one dot) and the CPU
    `conv2d`, which uses it for every stride-1 1x1 convolution: the output and both
    gradients of a
    nonlinear loss equal XLA's convolution's."""
    n, h, w, cin, cout = shape
    x = jax.random.normal(jax.random.PRNGKey(0), (n, h, w, cin))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (1, 1, cin, cout))

    def grads(conv_fn):
        loss = lambda x, k: jnp.sum(jnp.sin(conv_fn(x, k)))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, kernel)

    expected = grads(lambda x, k: reference(x, k, "SAME"))
    for ours in (conv.pointwise_conv, lambda x, k: cpu_ops.conv2d(x, k)):
        (value, (dx, dk)), (ref_value, (ref_dx, ref_dk)) = grads(ours), expected
        np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dk, ref_dk, rtol=1e-5, atol=1e-4)
    hlo = jax.jit(jax.grad(lambda k: jnp.sum(cpu_ops.conv2d(x, k) ** 2))).lower(kernel)
    hlo = hlo.compile()
    assert " dot(" in hlo.as_text() or "dot_general" in hlo.as_text()
