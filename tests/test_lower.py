"""Accelerator readiness without an accelerator: the train and eval steps a run jits, lowered
(not compiled) for cuda and tpu on this CPU machine, hold the convolutions of the model and
no custom call that only XLA:CPU implements."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from cliquejax import lower, summary
from configs import cliquenet_cifar10, cliquenet_imagenet, mbclique_cifar10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATORS = ("cuda", "tpu")
CONFIGS = {
    "cliquenet_k36_t12": cliquenet_cifar10.get_config,
    "mbcliquenet_cifar10": mbclique_cifar10.get_config,
    "cliquenet_s0_224": lambda: cliquenet_imagenet.get_config("S0"),
}
# Convolutions of one forward pass, counted from the architectures:
FORWARD_CONVOLUTIONS = {
    # stem + 3 blocks x (4 Stage-I + 4 Stage-II layers, one conv each) + 2 transitions
    "cliquenet_k36_t12": 1 + 3 * 8 + 2,
    # stem + 3 blocks x 4 layers x 2 stages x (1x1 + modulated 3x3) + 2 transitions + head
    "mbcliquenet_cifar10": 1 + 3 * 4 * 2 * 2 + 2 + 1,
    # stem + (5 + 6 + 6 + 6) layers x 2 stages x (1x1 + 3x3 bottleneck) + 4 compressions
    # + 3 transitions
    "cliquenet_s0_224": 1 + 23 * 2 * 2 + 4 + 3,
}


@functools.cache
def traced(name: str, dtype: str):
    config = CONFIGS[name]()
    config.train.compute_dtype = dtype
    config.train.batch_size = config.train.eval_batch_size = 8  # the program's ops are the same
    # the kernels a GPU or TPU resolves `auto` to (both resolve it alike)
    config = lower.for_platform(config, "cuda")
    return config, lower.traced_steps(config)


def described(name: str, dtype: str) -> dict:
    config, steps = traced(name, dtype)
    return {platform: lower.describe(config, platform, steps) for platform in ACCELERATORS}


def assert_portable(result: dict) -> None:
    for calls in (result["custom_calls"], result["eval"]["custom_calls"]):
        assert set(calls) <= lower.PORTABLE_CALL_TARGETS, (result["platform"], calls)


def test_count_ops_reads_calls_and_custom_calls():
    """The counter sees a CPU-only custom call (LAPACK) where there is one, and counts an op
    of a function called twice twice."""
    x = jax.ShapeDtypeStruct((4, 4), jnp.float32)
    on = lambda platform: lower.count_ops(jax.jit(jnp.linalg.cholesky).trace(x).lower(
        lowering_platforms=(platform,)).compiler_ir("stablehlo"))
    assert any(c.startswith("lapack_") for c in on("cpu")["custom_calls"])
    assert not set(on("cuda")["custom_calls"]) <= lower.PORTABLE_CALL_TARGETS
    inner = jax.jit(lambda a, b: jnp.dot(a, b))
    lowered = jax.jit(lambda a: inner(inner(a, a), a)).trace(x).lower(
        lowering_platforms=("tpu",))
    assert lowered.as_text().count("stablehlo.dot_general") == 1  # one function, called twice
    assert lower.count_ops(lowered.compiler_ir("stablehlo"))["dots"] == 2


@pytest.mark.slow
def test_float32_steps_lower_for_cuda_and_tpu():
    for name, forward in FORWARD_CONVOLUTIONS.items():
        for platform, result in described(name, "float32").items():
            assert result["eval"]["convolutions"] == forward, (name, platform)
            # forward + input and kernel gradients (and any recomputation) are convolutions
            assert result["convolutions"] >= 2 * forward, (name, platform)
            assert_portable(result)


@pytest.mark.slow
def test_bfloat16_convolutions_stay_convolutions_on_cuda_and_tpu():
    for name, forward in FORWARD_CONVOLUTIONS.items():
        float32 = described(name, "float32")
        for platform, result in described(name, "bfloat16").items():
            assert result["eval"]["convolutions"] == forward, (name, platform)
            assert result["convolutions"] == float32[platform]["convolutions"], (name, platform)
            assert result["conditionals"] == float32[platform]["conditionals"], (name, platform)
            assert_portable(result)


def test_the_loop_form_lowers_one_body_per_stage():
    """model.unroll=False: each stage of a block is one `fori_loop` body, whose convolution the
    program holds once; the FLOP counter reads the step's jaxpr through the loops."""
    config = cliquenet_cifar10.get_config()
    config.model.update(k=4, T=12, unroll=False)
    config.train.batch_size = config.train.eval_batch_size = 8
    result = lower.describe(lower.for_platform(config, "cuda"), "cuda")
    assert result["eval"]["convolutions"] == 1 + 3 * 2 + 2  # stem, 3 x (I, II), transitions
    assert result["flops"] > 2 * 8 * result["flops_per_image"] > 0
    assert_portable(result)


def test_flops_per_image_is_the_summary_figure():
    from cliquejax import summary

    config, _ = traced("mbcliquenet_cifar10", "float32")
    result = described("mbcliquenet_cifar10", "float32")["cuda"]
    assert result["flops_per_image"] == summary.summarize(config)["flops"]
    # the train step: forward and backward of the whole batch, at least 2x the forward
    assert result["flops"] >= 2 * 8 * result["flops_per_image"]
    assert result["param_bytes"] == 4 * summary.summarize(config)["params"]


@pytest.mark.slow
def test_macs_of_a_shard_map_count_every_device():
    """Under `jax.shard_map` (`train.bn_statistics=per_device`) the body's shapes are one
    device's: its MACs count once per device, so the logged MFU and the report's FLOPs are
    the global batch's, as with the sharded `jit`."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.AbstractMesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    matmul = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(P("data"), P()),
                           out_specs=P("data"), check_vma=False)
    traced = jax.make_jaxpr(matmul)(jnp.ones((8, 3)), jnp.ones((3, 5)))
    assert sum(summary.jaxpr_macs(traced.jaxpr).values()) == 8 * 3 * 5


def test_command_line_json_and_bad_platform():
    base = [sys.executable, "-m", "cliquejax.lower", "--config=configs/mbclique_digits.py"]
    done = subprocess.run([*base, "--platform=tpu", "--json"], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    result = json.loads(done.stdout)
    # stem + 3 blocks x 3 layers x 2 stages x (1x1 + modulated 3x3) + 2 transitions + head
    assert result["platform"] == "tpu" and result["eval"]["convolutions"] == 1 + 36 + 2 + 1
    for key in ("convolutions", "dots", "custom_calls", "flops"):
        assert key in result
    bad = subprocess.run([*base, "--platform=gpu"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "error: --platform='gpu' is not one of: cuda, tpu, cpu"]


def test_compute_dtype_auto_is_bfloat16_on_cuda_and_tpu_float32_on_the_cpu():
    """`train.compute_dtype=auto` (the default): the lowered train step's convolutions take
    bfloat16 on cuda and tpu, float32 on the CPU (the stock operations there, to compare)."""
    from tests.conftest import tiny_digits_config

    config = tiny_digits_config(batch_size=8, eval_batch_size=8)
    assert config.train.compute_dtype == "auto"
    for platform, dtype in (("cuda", "bf16"), ("tpu", "bf16"), ("cpu", "f32")):
        resolved = lower.for_platform(config, platform)
        assert resolved.train.compute_dtype == {"bf16": "bfloat16", "f32": "float32"}[dtype]
        resolved.train.kernels = "reference"
        train, _, _ = lower.traced_steps(resolved)
        counts = lower.count_ops(train.lower(lowering_platforms=(platform,))
                                 .compiler_ir("stablehlo"))
        assert set(counts["convolution_dtypes"]) == {dtype}, (platform, counts)
        assert counts["convolution_dtypes"][dtype] == counts["convolutions"] > 0
