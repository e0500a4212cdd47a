"""What the jitted train step will run on an accelerator, read on any machine.

    python -m cliquejax.lower --config=configs/mbclique_cifar10.py --platform=cuda [--json]

Lowers (does not compile) the train step and the eval step of a config, as `launch.py`
builds them, for `--platform` (cuda | tpu | cpu) from abstract inputs
(`jax.ShapeDtypeStruct`: nothing is allocated, no data is read, no accelerator is needed),
and counts what the StableHLO program holds, walking the lowered MLIR module: convolutions,
dot products, conditionals and custom calls. An op in a function called n times counts n
times; an op in a loop body counts once. Kernels (`config.train.kernels`) set to `auto` are
resolved as the target platform resolves them (`kernels.resolve`): the CPU kernels for
`cpu`, the reference operations for `cuda` and `tpu`.

FLOPs come from the project's counter (`summary.jaxpr_macs`, every convolution and dot
product of the jaxpr, FLOPs = 2 x MACs): `flops` is the whole train step, forward,
backward and recomputation, for the global batch of `train.batch_size`;
`flops_per_image` is the inference forward pass of one image (the `summary` figure on the
reference operations; the CPU kernels' matrix products also multiply padding, so theirs
is higher).
The learning-rate schedule is built for one step per epoch: only its constants depend on
the data set size, not the program's operations.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.mlir import ir

from cliquejax import cli, kernels, summary
from cliquejax.train import loop, preflight, step

PLATFORMS = ("cuda", "tpu", "cpu")
# Custom-call targets every XLA backend implements (sharding annotations, host offload).
PORTABLE_CALL_TARGETS = frozenset({
    "Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "annotate_device_placement",
    "MoveToHost", "MoveToDevice",
})

_KINDS = {"stablehlo.convolution": "convolutions", "stablehlo.dot_general": "dots",
          "stablehlo.dot": "dots", "stablehlo.case": "conditionals", "stablehlo.if": "conditionals"}


def _function_counts(function) -> tuple[collections.Counter, collections.Counter]:
    """(op kind -> count, callee -> times called) of one `func.func`, its nested regions
    (loop bodies, branches) included."""
    counts, calls = collections.Counter(), collections.Counter()

    def visit(op):
        if op.name in _KINDS:
            counts[_KINDS[op.name]] += 1
            if op.name == "stablehlo.convolution":  # the dtype its input is computed in
                counts["conv_dtype:" + str(ir.RankedTensorType(op.operands[0].type)
                                           .element_type)] += 1
        elif op.name == "stablehlo.custom_call":
            counts["custom_call:" + ir.StringAttr(op.attributes["call_target_name"]).value] += 1
        elif op.name == "func.call":
            calls[ir.FlatSymbolRefAttr(op.attributes["callee"]).value] += 1
        return ir.WalkResult.ADVANCE

    function.operation.walk(visit)
    return counts, calls


def count_ops(module) -> dict:
    """Convolutions (and their input dtypes), dots, conditionals and custom calls of a
    lowered StableHLO module (`Lowered.compiler_ir("stablehlo")`), counting each function's
    ops once per call from `main`."""
    own, calls = {}, {}
    for function in module.body.operations:
        name = ir.StringAttr(function.attributes["sym_name"]).value
        own[name], calls[name] = _function_counts(function)
    totals: dict[str, collections.Counter] = {}

    def total(name):
        if name not in totals:
            counts = collections.Counter(own.get(name, {}))
            for callee, times in calls.get(name, {}).items():
                for key, value in total(callee).items():
                    counts[key] += value * times
            totals[name] = counts
        return totals[name]

    counts = total("main" if "main" in own else next(iter(own), "main"))
    custom = {key.split(":", 1)[1]: n for key, n in counts.items()
              if key.startswith("custom_call:")}
    conv_dtypes = {key.split(":", 1)[1]: n for key, n in counts.items()
                   if key.startswith("conv_dtype:")}
    return {"convolutions": counts["convolutions"], "dots": counts["dots"],
            "conditionals": counts["conditionals"], "custom_calls": sorted(custom),
            "custom_call_counts": dict(sorted(custom.items())),
            "convolution_dtypes": dict(sorted(conv_dtypes.items()))}


def for_platform(config, platform: str):
    """A copy of `config` with `train.kernels` and `train.remat` resolved as `platform`
    resolves them (`auto`: the CPU kernels and their remat for `cpu`, the reference
    operations without remat for `cuda` and `tpu`)."""
    if platform not in PLATFORMS:
        raise ValueError(f"--platform={platform!r} is not one of: {', '.join(PLATFORMS)}")
    config = copy.deepcopy(config)
    if "kernels" in config.train:
        config.train.kernels = kernels.resolve(config, backend=platform)
    if "remat" in config.train:
        config.train.remat = kernels.remat(config.train.remat, backend=platform)
    if "compute_dtype" in config.train:
        config.train.compute_dtype = kernels.compute_dtype(config.train.compute_dtype, platform)
    return config


def traced_steps(config, devices=None):
    """(traced train step, traced eval step, abstract state) of `config`, on abstract inputs.
    The steps are the ones a run jits (`loop.build_model_and_transforms`, `step.jit_steps`),
    over a mesh of `devices` (default: JAX's; `simulated_gpus` for `--compile`)."""
    loop.validate_train(config.train)  # the checks a run makes first (batch sizes >= 1)
    preflight.check_seed(config.seed)
    preflight.check_batch_sizes(config.train)  # names the field that does not divide
    image_shape, num_classes = summary.model_input(config)
    model, transforms, schedule, binary_mask = loop.build_model_and_transforms(
        config, image_shape, num_classes, steps_per_epoch=1)
    state = jax.eval_shape(lambda: step.init_state(model, transforms, image_shape, config.seed))
    shardings = step.make_shardings(config.train.batch_size, devices)
    # the data set's statistics are constants of the program: any values lower the same ops
    channels = image_shape[-1]
    train_view, eval_view = loop.device_views(config, image_shape, np.zeros(channels, np.float32),
                                              np.ones(channels, np.float32))
    train, evaluate = step.jit_steps(model, transforms, schedule, config, shardings, state,
                                     binary_mask, train_view=train_view, eval_view=eval_view)

    def batch(size, **extra):  # what the pipeline gives: uint8 images (`cliquejax.data`)
        return {"image": jax.ShapeDtypeStruct((size, *image_shape), jnp.uint8),
                "label": jax.ShapeDtypeStruct((size,), jnp.int32),
                **{key: jax.ShapeDtypeStruct(*spec) for key, spec in extra.items()}}

    train_size, eval_size = config.train.batch_size, config.train.eval_batch_size
    return (train.trace(state, batch(train_size, position=((train_size, 2), jnp.int32))),
            evaluate.trace(state, batch(eval_size, mask=((eval_size,), jnp.float32))), state)


def describe_lowered(traced, platform: str) -> dict:
    """Op counts of `traced` lowered for `platform`, and its FLOPs (2 x MACs)."""
    lowered = traced.lower(lowering_platforms=(platform,))
    counts = count_ops(lowered.compiler_ir("stablehlo"))
    counts["flops"] = 2 * int(sum(summary.jaxpr_macs(traced.jaxpr.jaxpr).values()))
    return counts


def _nbytes(tree) -> int:
    return int(sum(np.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)))


def describe(config, platform: str, traced=None) -> dict:
    """What the lowered train step (and eval step) of `config` holds on `platform`.
    `traced`: `traced_steps(for_platform(config, platform))` when already computed."""
    config = for_platform(config, platform)
    train, evaluate, state = traced or traced_steps(config)
    result = {"platform": platform, "model": config.model.name,
              "compute_dtype": config.train.get("compute_dtype", "float32"),
              "kernels": config.train.get("kernels", "(none)"),
              "batch_size": config.train.batch_size}
    result.update(describe_lowered(train, platform))
    eval_counts = describe_lowered(evaluate, platform)
    result["flops_per_image"] = eval_counts["flops"] // config.train.eval_batch_size
    result["param_bytes"] = _nbytes(state["params"])
    result["state_bytes"] = _nbytes(state)
    result["eval"] = {key: eval_counts[key] for key in
                      ("convolutions", "dots", "conditionals", "custom_calls", "flops")}
    return result


GPU_PLUGINS = ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12", "jax_cuda13_plugin",
               "jax_cuda12_plugin")
NO_PLUGIN = ("error: --compile needs jax's CUDA plugin, whose XLA:GPU compiles for a simulated "
             "GPU on this CPU; allowed: `make venv-gpu`, then .venv-gpu/bin/python -m "
             "cliquejax.lower --compile ...")


def gpu_plugin_installed() -> bool:
    import importlib.util

    def found(name):
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            return False

    return any(found(name) for name in GPU_PLUGINS)


def simulated_gpus(target: str, count: int):
    """`count` simulated GPUs of `target` (a `cliquejax.targets` name): XLA:GPU compiles for
    them on a CPU-only machine (JAX_PLATFORMS=cpu, JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1, set by
    `main`); nothing runs on them."""
    from jax.experimental import topologies

    from cliquejax import targets

    if count < 1:
        raise ValueError(f"--devices={count} is out of range; allowed: >= 1")
    if not gpu_plugin_installed():
        raise ValueError(NO_PLUGIN.removeprefix("error: "))
    description = topologies.get_topology_desc(
        target, "cuda", target_config=targets.gpu_target_config(target),
        topology=f"1x1x{count}")
    return description.devices


def describe_compiled(config, target: str, count: int = 1, save_hlo: str = "") -> dict:
    """The train step as a run jits it, compiled by XLA:GPU for `count` simulated `target`
    GPUs, read from the optimized program (`cliquejax.hlo`): kernels by kind, bytes moved,
    device memory, all-reduces, and the roofline estimate of a step (images/s, MFU)."""
    from cliquejax import targets

    devices = simulated_gpus(target, count)
    config = for_platform(config, "cuda")
    train, _, _ = traced_steps(config, devices)
    flops = 2 * int(sum(summary.jaxpr_macs(train.jaxpr.jaxpr).values()))
    compiled = train.lower().compile()
    memory = compiled.memory_analysis()
    if save_hlo:  # the optimized program, to read again (`report_from_hlo`) or by eye
        with open(save_hlo, "w") as handle:
            handle.write(compiled.as_text())
    result = {"target": target, "device_kind": devices[0].device_kind, "devices": count,
              "model": config.model.name, "compute_dtype": config.train.compute_dtype,
              "batch_size": config.train.batch_size,
              "argument_bytes": int(memory.argument_size_in_bytes),
              "output_bytes": int(memory.output_size_in_bytes),
              "alias_bytes": int(memory.alias_size_in_bytes),
              "temp_bytes": int(memory.temp_size_in_bytes), "flops": flops}
    result.update(report_from_hlo(compiled.as_text(), targets.load()[target], count,
                                  config.train.batch_size, flops, config.train.compute_dtype))
    return result


def report_from_hlo(text: str, target: dict, devices: int, batch_size: int, flops: float,
                    dtype: str) -> dict:
    """The figures of one device's optimized program `text` (`hlo.kernels`): per step
    (every device runs the same program on its `batch_size / devices` images), per image,
    and the roofline (`hlo.roofline`). `flops`: the global step's counted FLOPs (the
    project's counter, `summary.jaxpr_macs`); MFU is them over the step time and the
    devices' peak in `dtype`."""
    from cliquejax import hlo

    kernels_list = hlo.kernels(text)
    result = hlo.summarize(kernels_list)
    result["bytes_per_image"] = result["bytes_moved"] * devices / batch_size
    estimate = hlo.roofline(kernels_list, target, devices)
    seconds = estimate["step_seconds"]
    result.update({"roofline_" + key: value for key, value in estimate.items()})
    result["images_per_second"] = batch_size / seconds if seconds else None
    result["mfu"] = flops / seconds / (devices * target["peak_flops"][dtype]) \
        if seconds else None
    return result


def format_compiled(result: dict) -> str:
    by_kind = result["kernels_by_kind"]
    per_device = result["batch_size"] // result["devices"]
    gb = lambda n: f"{n / 1e9:,.2f} GB"  # noqa: E731
    mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
    return "\n".join([
        f"{result['model']} train step compiled by XLA:GPU for {result['devices']} simulated "
        f"{result['device_kind']} ({result['compute_dtype']}, batch {result['batch_size']}"
        f", {per_device} per device); per device and step:",
        f"  kernels       {result['kernels']:>8}   (cuDNN convolutions {by_kind['convolutions']}"
        f", GEMMs {by_kind['gemms']}, fusions {by_kind['fusions']}, copies "
        f"{by_kind['copies']}, collectives {by_kind['collectives']}, custom calls "
        f"{by_kind['custom_calls']}, other {by_kind['other']})",
        f"  bytes moved   {gb(result['bytes_moved'])} read + written by the kernels "
        f"({result['bytes_per_image'] / 1e6:,.1f} MB per image)",
        f"  memory        arguments {mb(result['argument_bytes'])}, outputs "
        f"{mb(result['output_bytes'])} ({mb(result['alias_bytes'])} of them donated "
        f"arguments), temp {mb(result['temp_bytes'])}",
        f"  all-reduces   {result['all_reduces']:>8}   ({result['all_reduce_bytes'] / 1e6:,.1f}"
        f" MB)",
        f"  roofline      {result['roofline_step_seconds'] * 1e3:.2f} ms per step "
        f"(memory-bound kernels {result['roofline_memory_seconds'] * 1e3:.2f}, compute-bound "
        f"{result['roofline_compute_seconds'] * 1e3:.2f}, fixed costs "
        f"{result['roofline_fixed_seconds'] * 1e3:.2f}, collectives "
        f"{result['roofline_collective_seconds'] * 1e3:.2f}): "
        f"{result['images_per_second']:,.0f} images/s, MFU {100 * result['mfu']:.1f}%",
    ])


def format_report(result: dict) -> str:
    ev = result["eval"]
    calls = ", ".join(f"{name} x{n}" for name, n in result["custom_call_counts"].items())
    return "\n".join([
        f"{result['model']} train step lowered for {result['platform']} "
        f"({result['compute_dtype']}, kernels {result['kernels']}, "
        f"batch {result['batch_size']}; not compiled)",
        f"  convolutions  {result['convolutions']:>8}   (eval step {ev['convolutions']})",
        f"  dot products  {result['dots']:>8}   (eval step {ev['dots']})",
        f"  conditionals  {result['conditionals']:>8}   (eval step {ev['conditionals']})",
        f"  custom calls  {calls or 'none'}",
        f"  parameters    {result['param_bytes']:,} bytes; train state "
        f"{result['state_bytes']:,} bytes",
        f"  FLOPs         {result['flops'] / 1e9:,.2f} G per train step "
        f"(forward + backward, the whole batch); {result['flops_per_image'] / 1e9:.3f} G "
        f"per image forward",
    ])


def main(argv) -> None:
    from absl import flags

    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; allowed: --config, --platform, --json, "
              "--compile, --gpu, --devices", file=sys.stderr)
        sys.exit(2)
    if not jax.config.jax_platforms:
        # lowering needs no accelerator: skip probing for one (and its log lines)
        jax.config.update("jax_platforms", "cpu")
    config = cli.load_config_flag(flags.FLAGS)
    FLAGS = flags.FLAGS
    try:
        if FLAGS.compile:
            from cliquejax import targets

            if FLAGS.gpu not in targets.gpu_names():
                raise ValueError(f"--gpu={FLAGS.gpu!r} is not one of: "
                                 f"{', '.join(targets.gpu_names())}")
            result = describe_compiled(config, FLAGS.gpu, FLAGS.devices, FLAGS.save_hlo)
            text = format_compiled(result)
        else:
            result = describe(config, FLAGS.platform)
            text = format_report(result)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result) if FLAGS.json else text)


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
    flags.DEFINE_string("platform", "cuda", f"The platform to lower for: {' | '.join(PLATFORMS)}.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of the report.")
    flags.DEFINE_bool("compile", False, "Compile the train step with XLA:GPU for simulated "
                      "GPUs (--gpu, --devices) and report its kernels, bytes, memory and a "
                      "roofline estimate (needs jax's CUDA plugin: make venv-gpu).")
    flags.DEFINE_string("gpu", "h100", "--compile: the GPU, a cliquejax/targets name: h100 | "
                        "h200 | a100.")
    flags.DEFINE_integer("devices", 1, "--compile: how many simulated GPUs (batch sharded).")
    flags.DEFINE_string("save_hlo", "", "--compile: write the optimized HLO text to this file.")
    flags.mark_flags_as_required(["config"])
    # XLA:GPU compiles for the simulated GPUs with no GPU present (`simulated_gpus`)
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    sys.path.insert(0, ".")
    cli.run_app(main)
