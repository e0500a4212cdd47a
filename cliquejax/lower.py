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


def traced_steps(config):
    """(traced train step, traced eval step, abstract state) of `config`, on abstract inputs.
    The steps are the ones a run jits (`loop.build_model_and_transforms`, `step.jit_steps`)."""
    loop.validate_train(config.train)  # the checks a run makes first (batch sizes >= 1)
    preflight.check_seed(config.seed)
    preflight.check_batch_sizes(config.train)  # names the field that does not divide
    image_shape, num_classes = summary.model_input(config)
    model, transforms, schedule, binary_mask = loop.build_model_and_transforms(
        config, image_shape, num_classes, steps_per_epoch=1)
    state = jax.eval_shape(lambda: step.init_state(model, transforms, image_shape, config.seed))
    shardings = step.make_shardings(config.train.batch_size)
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
        print(f"error: unexpected arguments {argv[1:]}; allowed: --config, --platform, --json",
              file=sys.stderr)
        sys.exit(2)
    if not jax.config.jax_platforms:
        # lowering needs no accelerator: skip probing for one (and its log lines)
        jax.config.update("jax_platforms", "cpu")
    config = cli.load_config_flag(flags.FLAGS)
    try:
        result = describe(config, flags.FLAGS.platform)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result) if flags.FLAGS.json else format_report(result))


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
    flags.DEFINE_string("platform", "cuda", f"The platform to lower for: {' | '.join(PLATFORMS)}.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of the report.")
    flags.mark_flags_as_required(["config"])
    sys.path.insert(0, ".")
    cli.run_app(main)
