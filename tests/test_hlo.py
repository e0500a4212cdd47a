"""Reading a compiled program (`cliquejax.hlo`, `cliquejax.lower --compile`): the kernels,
bytes, FLOPs and roofline of small programs whose answer is worked out by hand. The text
readers need no plugin; the XLA:GPU compiles need jax's CUDA plugin (`make venv-gpu`) and
skip without it."""

import os

import jax
import jax.numpy as jnp
import pytest

from cliquejax import hlo, lower

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # XLA:GPU with no GPU
NEEDS_PLUGIN = pytest.mark.skipif(
    not lower.gpu_plugin_installed(),
    reason="needs jax's CUDA plugin (make venv-gpu; run with .venv-gpu/bin/python and "
           "JAX_PLATFORMS=cpu)")

# A hand-written scheduled XLA:GPU module: a cuDNN convolution (with its u8 workspace), a
# Triton GEMM fusion, an elementwise fusion, an asynchronous all-reduce and a copy.
HAND_WRITTEN = """\
HloModule hand, is_scheduled=true

%fused_add (p0: bf16[256,64], p1: bf16[256,64]) -> bf16[256,64] {
  %p0 = bf16[256,64]{1,0} parameter(0)
  %p1 = bf16[256,64]{1,0} parameter(1)
  ROOT %add = bf16[256,64]{1,0} add(%p0, %p1)
}

%sum (x: bf16[], y: bf16[]) -> bf16[] {
  %x = bf16[] parameter(0)
  %y = bf16[] parameter(1)
  ROOT %s = bf16[] add(%x, %y)
}

%gemm_body (a: bf16[256,128], b: bf16[128,64]) -> bf16[256,64] {
  %a = bf16[256,128]{1,0} parameter(0)
  %b = bf16[128,64]{1,0} parameter(1)
  ROOT %d = bf16[256,64]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: bf16[8,32,32,16], w: bf16[32,3,3,16], a: bf16[256,128], b: bf16[128,64]) -> (bf16[256,64], bf16[8,32,32,32]) {
  %x = bf16[8,32,32,16]{3,2,1,0} parameter(0), metadata={op_name="x"}
  %w = bf16[32,3,3,16]{3,2,1,0} parameter(1)
  %a = bf16[256,128]{1,0} parameter(2)
  %b = bf16[128,64]{1,0} parameter(3)
  %conv = (bf16[8,32,32,32]{3,2,1,0}, u8[1024]{0}) custom-call(%x, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", backend_config={"algorithm":{"algo_id":"-1"}}
  %y = bf16[8,32,32,32]{3,2,1,0} get-tuple-element(%conv), index=0
  %gemm = bf16[256,64]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_body, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %added = bf16[256,64]{1,0} fusion(%gemm, %gemm), kind=kLoop, calls=%fused_add
  %ars = bf16[256,64]{1,0} all-reduce-start(%added), replica_groups={{0,1}}, to_apply=%sum
  %ard = bf16[256,64]{1,0} all-reduce-done(%ars)
  %copy = bf16[256,64]{0,1} copy(%ard)
  ROOT %out = (bf16[256,64]{0,1}, bf16[8,32,32,32]{3,2,1,0}) tuple(%copy, %y)
}
"""  # noqa: E501 (HLO lines are long)
TARGET = {"peak_flops": {"bfloat16": 1e12, "float32": 0.5e12}, "memory_bandwidth": 1e11,
          "kernel_seconds": 1e-6, "collective_seconds": 5e-6, "interconnect_bandwidth": 1e8}


def test_hand_written_program_kernels_bytes_and_flops():
    kernels = hlo.kernels(HAND_WRITTEN)
    assert [(k["name"], k["kind"]) for k in kernels] == [
        ("conv", "convolutions"), ("gemm", "gemms"), ("added", "fusions"),
        ("ars", "collectives"), ("copy", "copies")]
    by_name = {k["name"]: k for k in kernels}
    # x 8*32*32*16*2 + w 32*3*3*16*2 + y 8*32*32*32*2 (the u8 workspace is not data)
    assert by_name["conv"]["bytes"] == 262144 + 9216 + 524288
    # per output element 3*3*16 multiply-adds, 2 FLOPs each
    assert by_name["conv"]["flops"] == 2 * 8 * 32 * 32 * 32 * 3 * 3 * 16
    assert by_name["conv"]["dtype"] == "bf16"
    assert by_name["gemm"]["bytes"] == 256 * 128 * 2 + 128 * 64 * 2 + 256 * 64 * 2
    assert by_name["gemm"]["flops"] == 2 * 256 * 64 * 128
    assert by_name["added"]["bytes"] == 3 * 256 * 64 * 2 and by_name["added"]["flops"] == 0
    summary = hlo.summarize(kernels)
    assert summary["kernels"] == 5 and summary["kernels_by_kind"] == {
        "convolutions": 1, "gemms": 1, "fusions": 1, "copies": 1, "collectives": 1,
        "custom_calls": 0, "other": 0}
    assert summary["all_reduces"] == 1 and summary["all_reduce_bytes"] == 256 * 64 * 2
    assert summary["bytes_moved"] == 795648 + 114688 + 98304 + 65536 + 65536


def test_hand_written_program_roofline():
    estimate = hlo.roofline(hlo.kernels(HAND_WRITTEN), TARGET, devices=2)
    # conv: 75,497,472 FLOPs / 1e12 = 75.497 us > 795,648 B / 1e11 = 7.96 us (compute)
    # gemm: 4,194,304 / 1e12 = 4.194 us > 114,688 / 1e11 = 1.15 us (compute)
    assert estimate["compute_seconds"] == pytest.approx(75.497472e-6 + 4.194304e-6)
    # add fusion 98,304 B and copy 65,536 B at 1e11 B/s
    assert estimate["memory_seconds"] == pytest.approx(0.98304e-6 + 0.65536e-6)
    assert estimate["fixed_seconds"] == pytest.approx(4e-6)  # 4 kernels x 1 us
    # ring all-reduce of 32,768 B over 2 devices: 2 (2 - 1) / 2 x 32,768 / 1e8 + 5 us
    assert estimate["collective_seconds"] == pytest.approx(327.68e-6 + 5e-6)
    assert estimate["step_seconds"] == pytest.approx(418.010176e-6)
    report = lower.report_from_hlo(HAND_WRITTEN, TARGET, devices=2, batch_size=16,
                                   flops=2 * 80e6, dtype="bfloat16")
    assert report["images_per_second"] == pytest.approx(16 / 418.010176e-6)
    assert report["mfu"] == pytest.approx(160e6 / 418.010176e-6 / 2e12)
    assert report["bytes_per_image"] == pytest.approx(report["bytes_moved"] * 2 / 16)


def test_cpu_compiled_program_is_read():
    """A program XLA:CPU compiled: the matrix product's FLOPs are found, wherever the
    compiler put it (a fused library call or a plain dot)."""
    product = jax.jit(lambda a, b: jnp.tanh(a @ b) + 1).lower(
        jax.ShapeDtypeStruct((64, 32), jnp.float32),
        jax.ShapeDtypeStruct((32, 16), jnp.float32)).compile()
    kernels = hlo.kernels(product.as_text())
    assert sum(k["flops"] for k in kernels) == 2 * 64 * 16 * 32
    assert hlo.summarize(kernels)["kernels_by_kind"]["gemms"] == 1


def test_no_entry_is_an_error():
    with pytest.raises(ValueError, match="no ENTRY"):
        hlo.kernels("HloModule empty\n")


@NEEDS_PLUGIN
def test_xla_gpu_program_of_a_convolution_gradient():
    """The kernel gradient of one 3x3 convolution, its batch of 8 over 2 simulated H100s:
    each device runs the forward and backward-filter convolutions of its 4 images and
    all-reduces the bfloat16 gradient."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from cliquejax import targets

    devices = lower.simulated_gpus("h100", 2)
    mesh = Mesh(devices, ("data",))

    def loss(w, x):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.mean(jax.nn.relu(y) ** 2)

    gradient = jax.jit(jax.grad(loss), in_shardings=(NamedSharding(mesh, P()),
                                                     NamedSharding(mesh, P("data"))),
                       out_shardings=NamedSharding(mesh, P()))
    compiled = gradient.lower(jax.ShapeDtypeStruct((3, 3, 16, 32), jnp.bfloat16),
                              jax.ShapeDtypeStruct((8, 32, 32, 16), jnp.bfloat16)).compile()
    kernels = hlo.kernels(compiled.as_text())
    summary = hlo.summarize(kernels)
    assert summary["kernels_by_kind"]["convolutions"] == 2
    assert summary["all_reduces"] == 1 and summary["all_reduce_bytes"] == 3 * 3 * 16 * 32 * 2
    convolutions = [k for k in kernels if k["kind"] == "convolutions"]
    assert [k["flops"] for k in convolutions] == [2 * 4 * 32 * 32 * 32 * 3 * 3 * 16] * 2
    estimate = hlo.roofline(kernels, targets.load()["h100"], devices=2)
    assert estimate["step_seconds"] > estimate["fixed_seconds"] == pytest.approx(
        (len(kernels) - 1) * 1e-6)


@NEEDS_PLUGIN
@pytest.mark.slow
def test_full_report_for_mbclique_cifar10():
    """`lower --compile --gpu=h100` on the paper's MBCliqueNet CIFAR-10 config (minutes)."""
    from configs import mbclique_cifar10

    result = lower.describe_compiled(mbclique_cifar10.get_config(), "h100", 1)
    for key in ("kernels", "kernels_by_kind", "bytes_moved", "temp_bytes", "all_reduces",
                "all_reduce_bytes", "roofline_step_seconds", "images_per_second", "mfu"):
        assert key in result, key
    assert result["compute_dtype"] == "bfloat16" and result["all_reduces"] == 0
    assert result["kernels_by_kind"]["convolutions"] >= 3 * 52 - 1  # the stem: no input grad
    assert 0 < result["mfu"] < 1 and result["temp_bytes"] > 0
    assert "roofline" in lower.format_compiled(result)


@pytest.mark.slow
def test_command_line_refuses_a_bad_gpu_and_names_the_plugin():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = [sys.executable, "-m", "cliquejax.lower", "--config=configs/mbclique_digits.py",
            "--compile"]
    bad = subprocess.run([*base, "--gpu=v100"], capture_output=True, text=True, cwd=root)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "error: --gpu='v100' is not one of: a100, h100, h200"]
    if not lower.gpu_plugin_installed():
        done = subprocess.run(base, capture_output=True, text=True, cwd=root)
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [lower.NO_PLUGIN]
