"""Model summary: parameters, multiply-accumulates and output shape per top-level module.

    python -m cliquejax.summary --config=configs/cliquenet_cifar10.py [--config.model.k=64] [--json]

Parameters are counted from the real parameter tree (`jax.eval_shape`, nothing allocated)
the way the original code counts them: every trainable variable (conv kernels, BN scale and
offset, dense weights and biases); BN moving statistics are a separate collection and are not
counted. MACs are read off the jaxpr of the inference forward pass for one image: every
`conv_general_dilated` and `dot_general`, attributed to the module in whose name scope it runs.
FLOPs = 2 x MACs, the convention of the published tables.

Binary models (MBCliqueNet) also get their storage: 1 bit per binary weight, 32 per float
parameter, per module and in total, and the conv filters' ratio against two baselines, each
named: the full-precision CliqueNet of the same widths without modulation
(`conv_compression_vs_full_precision`, also `conv_compression`), and u-MBCliqueNet, the
same network with binarisation off and modulation kept (`conv_compression_vs_u_mbcliquenet`;
the MBCliqueNet paper's bracketed model, built here with `model.binarize=False`).
"""

from __future__ import annotations

import collections
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from cliquejax import bits, models, names

STATIC_INPUTS = {  # data set -> (image shape, classes); others come from config.data
    "cifar10": ((32, 32, 3), 10),
    "cifar100": ((32, 32, 3), 100),
    "svhn_cropped": ((32, 32, 3), 10),
    "mnist": ((28, 28, 1), 10),
    "digits": ((8, 8, 1), 10),
}


def model_input(config) -> tuple[tuple[int, int, int], int]:
    """(H, W, C) and class count of the configured data set, without reading it if known."""
    name = config.data.name
    if name in STATIC_INPUTS:
        return STATIC_INPUTS[name]
    if config.data.get("image_size", 0) and config.data.get("num_classes", 0):
        size = config.data.image_size
        return (size, size, 3), config.data.num_classes
    from cliquejax import data  # only needed for user data (npz, image folders)

    info = data.dataset_info(config.data)
    return tuple(info.image_shape), info.num_classes


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "jaxpr") and hasattr(item, "consts"):
                yield item.jaxpr
            elif hasattr(item, "eqns"):
                yield item


def _eqn_macs(eqn) -> int:
    if not eqn.outvars:  # e.g. a jit left with no outputs by partial evaluation (lax loops)
        return 0
    out = eqn.outvars[0].aval
    if eqn.primitive.name == "conv_general_dilated":
        kernel = eqn.invars[1].aval
        out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        return math.prod(out.shape) * math.prod(kernel.shape) // kernel.shape[out_dim]
    if eqn.primitive.name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval
        return math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
    return 0


def jaxpr_macs(jaxpr, prefix: str = "", counts=None, times: int = 1) -> dict[str, int]:
    """MACs per name scope (the scope path below the root module) of a jaxpr, recursing into
    sub-jaxprs (jit, custom_vjp, remat; scan bodies times their length; shard_map bodies,
    whose shapes are one device's, times the devices they run on)."""
    counts = collections.Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        scope = "/".join(filter(None, [prefix, str(eqn.source_info.name_stack)]))
        counts[scope] += _eqn_macs(eqn) * times  # zero entries keep the order of first use
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        if eqn.primitive.name == "shard_map":
            axes = next((eqn.params[key] for key in ("newly_manual_axes", "manual_axes",
                                                     "axis_names") if key in eqn.params), ())
            repeat = math.prod(eqn.params["mesh"].shape[axis] for axis in axes)
        for sub in _sub_jaxprs(eqn):
            jaxpr_macs(sub, scope, counts, times * repeat)
    return counts


def _top_module(scope: str, names) -> str:
    """The first component of a scope path that names a top-level module (the scopes of
    methods and functions such as `_stem` are skipped)."""
    return next((part for part in scope.split("/") if part in names), "(root)")


def _abstract_model(config):
    """(model, one abstract image, abstract variables, classes): nothing is allocated."""
    image_shape, num_classes = model_input(config)
    model = models.build_model(config, num_classes)
    image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), image)
    return model, image, variables, num_classes


def param_count(config) -> int:
    """The parameters of `config`'s model, counted as `summarize` counts them (one trace of
    init, nothing allocated)."""
    return _count(_abstract_model(config)[2]["params"])


def counts(config) -> tuple[int, int]:
    """(parameters, FLOPs) of `config` as `summarize` counts them, from one trace of init and
    one of the forward pass (no per-module rows, outputs or storage)."""
    model, image, variables, _ = _abstract_model(config)
    forward = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, image)
    return _count(variables["params"]), 2 * int(sum(jaxpr_macs(forward.jaxpr).values()))


def summarize(config) -> dict:
    """Per-module rows and totals for `config` (one image of the data set's size)."""
    model, image, variables, num_classes = _abstract_model(config)
    forward = lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                                       mutable=["intermediates"])
    _, state = jax.eval_shape(forward, variables, image)
    macs = collections.Counter()
    for scope, n in jaxpr_macs(jax.make_jaxpr(forward)(variables, image).jaxpr).items():
        macs[_top_module(scope, variables["params"])] += n
    order = [name for name in macs if name in variables["params"]]
    rows = []
    for name in order + sorted(set(variables["params"]) - set(order)):
        tree = variables["params"][name]
        outputs = state["intermediates"].get(name, {}).get("__call__", ())
        shapes = [tuple(o.shape[1:]) for o in jax.tree.leaves(outputs)]
        rows.append({"module": name, "params": _count(tree), "macs": int(macs.get(name, 0)),
                     "output": shapes[0] if len(shapes) == 1 else shapes})
    total_macs = int(sum(macs.values()))
    result = {"model": config.model.name, "input": list(image.shape[1:]), "classes": num_classes,
              "params": _count(variables["params"]), "macs": total_macs, "flops": 2 * total_macs,
              "batch_stats": _count(variables.get("batch_stats", {})), "modules": rows}
    if bits.has_quantized_layers(variables):
        result.update(storage_report(model, variables, rows))
        result.update(u_model_ratio(model, image, result["conv_packed_bytes"]))
    return result


FP_BASELINE = "the full-precision CliqueNet of the same widths without modulation"
U_BASELINE = "u-MBCliqueNet (the same network with binarisation off, modulation kept)"


def u_model_ratio(model, image, conv_packed_bytes: int) -> dict:
    """The conv filters' ratio against u-MBCliqueNet, the bracketed model of the MBCliqueNet
    paper's Table 1: that network built for real with `model.binarize=False`, its conv
    filters (latent filters of width / K, M-filters, 1x1 kernels) all float32."""
    u_model = model.clone(binarize=False)
    u_params = jax.eval_shape(lambda x: u_model.init(jax.random.PRNGKey(0), x), image)["params"]
    u_bytes = sum(4 * int(np.prod(leaf.shape))
                  for path, leaf in jax.tree_util.tree_leaves_with_path(u_params)
                  if names.is_kernel_path(path))
    return {"conv_u_mbcliquenet_bytes": u_bytes,
            "conv_compression_vs_u_mbcliquenet": u_bytes / conv_packed_bytes,
            "storage_baselines": {"conv_compression_vs_full_precision": FP_BASELINE,
                                  "conv_compression_vs_u_mbcliquenet": U_BASELINE}}


def storage_report(model, variables, rows) -> dict:
    """Bits of the deployable model (larq-style): 1 bit per binary weight, 32 per float
    parameter and BN statistic; per module and in total, plus the conv filters' ratio against
    the full-precision network of the same widths without modulation (K full filters per
    modulated latent filter), the reading of the papers' "reduced by at least 32x"."""
    params = variables["params"]
    binary = bits.binary_mask(variables)
    equivalent = model.conv_filter_equivalent(params)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    flat_binary, flat_equivalent = jax.tree.leaves(binary), jax.tree.leaves(equivalent)
    packed = collections.Counter()
    conv_packed = conv_float32 = binary_params = 0
    for (path, leaf), is_binary, fp_filters in zip(leaves, flat_binary, flat_equivalent,
                                                   strict=True):
        size = int(np.prod(leaf.shape))
        nbytes = (size + 7) // 8 if is_binary else 4 * size
        packed[str(path[0].key)] += nbytes
        binary_params += size if is_binary else 0
        conv_float32 += 4 * fp_filters
        conv_packed += nbytes if names.is_kernel_path(path) else 0
    stats = 4 * _count(variables.get("batch_stats", {}))
    for row in rows:
        row["bits"] = 8 * packed[row["module"]]
        row["float32_bits"] = 32 * row["params"]
        row["ratio"] = round(row["float32_bits"] / max(row["bits"], 1), 2)
    total_params = _count(params)
    packed_bytes = sum(packed.values()) + stats
    float32_bytes = 4 * total_params + stats
    return {"binary_params": binary_params, "float_params": total_params - binary_params,
            "packed_bytes": packed_bytes, "float32_bytes": float32_bytes,
            "latent_compression": float32_bytes / packed_bytes,
            "conv_float32_bytes": conv_float32, "conv_packed_bytes": conv_packed,
            # the first ratio's name is kept for scripts that read it; both name the same
            "conv_compression": conv_float32 / conv_packed,
            "conv_compression_vs_full_precision": conv_float32 / conv_packed}


def _count(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def format_table(summary: dict) -> str:
    bits = "packed_bytes" in summary
    head = f"{'module':<16}{'params':>12}{'MACs':>16}"
    head += f"{'bits':>13}{'32-bit eq.':>13}{'ratio':>7}" if bits else ""
    lines = [head + "  output", "-" * (len(head) + 16)]
    for row in summary["modules"]:
        line = f"{row['module']:<16}{row['params']:>12,}{row['macs']:>16,}"
        if bits:
            line += f"{row['bits']:>13,}{row['float32_bits']:>13,}{row['ratio']:>7.1f}"
        lines.append(f"{line}  {row['output']}")
    lines.append(lines[1])
    lines.append(f"{'total':<16}{summary['params']:>12,}{summary['macs']:>16,}")
    lines.append(f"params {summary['params'] / 1e6:.2f}M  FLOPs (2 x MACs) "
                 f"{summary['flops'] / 1e9:.2f}G for one {summary['input']} image")
    if bits:
        lines.append(
            f"binary params {summary['binary_params']:,}  float params "
            f"{summary['float_params']:,}  deployable {summary['packed_bytes'] / 1024:.1f} KiB "
            f"vs float32 {summary['float32_bytes'] / 1024:.1f} KiB "
            f"({summary['latent_compression']:.1f}x)")
        lines.append(
            f"conv filters {summary['conv_packed_bytes']:,} bytes: "
            f"{summary['conv_compression_vs_full_precision']:.1f}x smaller than {FP_BASELINE} "
            f"({summary['conv_float32_bytes']:,} bytes); "
            f"{summary['conv_compression_vs_u_mbcliquenet']:.1f}x smaller than {U_BASELINE} "
            f"({summary['conv_u_mbcliquenet_bytes']:,} bytes)")
    return "\n".join(lines)


def main(argv) -> None:
    from absl import flags

    from cliquejax import cli, data

    cli.refuse_arguments(argv)
    cli.quiet_logging()
    config = cli.load_config_flag(flags.FLAGS)
    try:
        summary = summarize(config)
    except (ValueError, KeyError, data.DatasetNotFoundError, FileNotFoundError) as error:
        cli.fail(f"error: {cli.one_line(error)}")
    print(json.dumps(summary) if flags.FLAGS.json else format_table(summary))


def run() -> None:
    """The command `python -m cliquejax.summary` (`cliquejax-summary` once installed)."""
    from absl import flags
    from ml_collections import config_flags

    from cliquejax import cli

    config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
    flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
    flags.mark_flags_as_required(["config"])
    cli.run_app(main)


if __name__ == "__main__":
    run()
