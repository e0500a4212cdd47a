"""The accelerator descriptions: every file complete, found by the device kind JAX reports."""

from cliquejax import targets


def test_every_target_has_its_figures_and_a_source():
    assert {"h100", "h200", "a100"} <= set(targets.load())
    for name, target in targets.load().items():
        assert target["platform"] in ("cuda", "tpu"), name
        assert target["peak_flops"]["bfloat16"] >= target["peak_flops"]["float32"] > 0, name
        assert target["memory_bandwidth"] > 0 and target["source"], name


def test_peak_by_device_kind_and_dtype():
    assert targets.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert targets.peak_flops("NVIDIA H200", "float32") == 494.7e12  # TF32
    assert targets.peak_flops("cpu", "float32") is None
    assert targets.for_device_kind("TPU v5 lite")["platform"] == "tpu"
