"""The papers' tables, published against ours:

    python -m cliquejax.reproduce                      # tables: published | ours | run
    python -m cliquejax.reproduce --runs DIR [DIR ...] # accuracies from these run directories
    python -m cliquejax.reproduce --json               # {"rows": [...], "unmatched_runs": [...]}
    python -m cliquejax.reproduce --commands           # the launch.py command of every row
    python -m cliquejax.reproduce --paper=mbcliquenet  # one paper's rows only

Rows: CliqueNet (Yang et al., CVPR 2018; table numbers of the authors' README) Tab 3
(parameters, FLOPs and test errors of CliqueNet and its DenseNet baselines on CIFAR-10,
CIFAR-100 and SVHN without augmentation), Tab 1 (the I+I / I+II / II+II variants) and Tab 2
(Stage-II updates of only the first X layers); MBCliqueNet Table 1 (parameters of the CIFAR
setting; accuracy of MBCliqueNet and, bracketed there, u-MBCliqueNet), Table 2 (parameters
and accuracy against K) and the Tiny ImageNet result of its Sec. 3.5. No reading of the
MBCliqueNet text gives its four parameter counts: their rows say how far ours is and what
the closest reading counts (docs/papers.md, "MBCliqueNet parameter counts"). Each row is
one published figure, in the papers' own terms: CliqueNet prints test error % (the best
epoch's, the original code's report), MBCliqueNet accuracy % (the paper does not say which
epoch's: "ours" is the final epoch's, and the best epoch's stands beside it, `ours_best`).
Values of a row's recipe that the source lost or never gave, and that the recipe therefore
reads or guesses, are marked on the row (`read_values`; `READ_VALUES`).

Parameters and FLOPs of ours are counted now by `cliquejax.summary` (shapes only, nothing
trained or allocated), for the network "ours" was measured on: a reduced run's own, else the
recipe's. Accuracies come from run directories written by launch.py
(config.json, results.json): `--runs` takes run directories or directories holding them,
by default every directory under the repository's `results/`.

The published figures live in `cliquejax/published.json`, beside this file.

A run is a row's run ("ours") when its config.json has the row's model (model.name and the
fields that make it that row: k, T, variant, x, attention, bottleneck, compression for
CliqueNet; k, T for DenseNet; binarize, K for MBCliqueNet) on the row's data set, and every
other field equals the row's recipe or changes only its scale: widths, layers, epochs or
steps, and the batch size together with the learning rates scaled by the linear rule (a
batch B' trains at lr * B' / B and min_lr * B' / B, B the recipe's batch: Goyal et al.,
2017, the rule the configs' docstrings state); a batch changed at the recipe's rates is
another run. A run that trained less than one cycle of an SGDR recipe never reaches its
minimum rate: another run too. A reduced run is shown with what it changes, and the params
and FLOPs beside it are its own network's. A run of the row's model and data set that changes
anything else (learning rate, augmentation, optimizer, schedule, BatchNorm...) is listed
under the table as another run, never as ours. A field absent from a run's config.json (a
run written before the field existed) takes the default in force then
(`run_dir.absent_value`, which resume reads too: a model field's module default, or the
table `run_dir.BEFORE_THE_FIELD`); one absent without such a value is a difference.
Bookkeeping fields (seed, data directory and path, logging, checkpointing, evaluation batch,
remat, unroll, kernels, workers) are not compared. The data set of an `npz` run is read
from its file name: one containing "cifar100", "cifar10", "svhn" or "mnist" (but not
"fashion") is that data set; an `image_folder` of 64 x 64 images and 100 classes is the
100-class Tiny ImageNet. When several runs are a row's, the full-recipe one wins, then the
one with fewest changes, then the most epochs. A run directory whose config.json or
results.json is malformed stops the command with one line naming the file.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import shlex
import sys


def flatten_config(tree: dict) -> dict:
    """A nested config dict as {"model.k": 36, ...} (imported here: this module starts fast)."""
    from cliquejax.train.run_dir import flatten

    return flatten(tree)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RUNS = os.path.join(REPO_ROOT, "results")
PUBLISHED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published.json")

PAPERS = {"cliquenet": "CliqueNet (CVPR 2018)", "mbcliquenet": "MBCliqueNet"}
DATASET_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn_cropped": "SVHN",
                  "mnist": "MNIST", "tiny_imagenet_100": "Tiny ImageNet-100"}
TABLE_TITLES = {
    ("cliquenet", "Tab 3"): "main results on CIFAR and SVHN without data augmentation",
    ("cliquenet", "Tab 1"): "block feature / transit feature variants; k and T are not given "
                            "by the source (its II+II 5.76 is not Tab 3's k=64, T=15 5.12): "
                            "run here at k=64, T=15",
    ("cliquenet", "Tab 2"): "Stage-II update of only the first X layers (k=64, T=15)",
    ("mbcliquenet", "Table 1"): "parameters and classification accuracy; u-MBCliqueNet is "
                                "bracketed there",
    ("mbcliquenet", "Table 2"): "effect of K, the M-filter's channels (widths 64-64-128)",
    ("mbcliquenet", "Sec. 3.5"): "100-class Tiny ImageNet",
}
METRICS = {
    "params": "params (M)",
    "flops": "FLOPs (G)",
    "error_best": "test error % (best epoch)",
    "accuracy_final": "test accuracy % (final epoch)",
    "top5_final": "top-5 accuracy % (final epoch)",
}
COUNTS = ("params", "flops")
IDENTITY = {  # the fields that make a run a run of the row (besides the data set)
    "cliquenet": ("model.name", "model.k", "model.T", "model.variant", "model.x",
                  "model.attention", "model.bottleneck", "model.compression"),
    "densenet": ("model.name", "model.k", "model.T"),
    "mbcliquenet": ("model.name", "model.binarize", "model.K"),
}
# What a reduced run may change: its size and length, nothing of the recipe's method; the
# batch size only with the learning rates of LR_FIELDS scaled by the linear rule
# (`batch_change`).
SCALE = ("model.widths", "model.layers", "train.epochs", "train.max_steps")
BATCH = "train.batch_size"
LR_FIELDS = ("optimizer.lr", "schedule.min_lr")
NOT_COMPARED = ("seed", "data.name", "data.data_dir", "data.path", "data.worker_count",
                "train.log_every_steps", "train.eval_every_epochs",
                "train.checkpoint_every_epochs", "train.keep_checkpoints",
                "train.eval_batch_size", "train.remat", "train.kernels", "model.unroll",
                "train.peak_flops", "train.checkpoint_every_steps", "train.profile_steps",
                # `auto` (the recipes) records bfloat16 on an accelerator, float32 on a CPU
                "train.compute_dtype")
# What results.json must hold, as launch.py writes it: (low, high, may be null); accuracies
# are fractions, null when the run never evaluated.
RESULT_FIELDS = {"epochs": (0.0, math.inf, False), "final_test_accuracy": (0.0, 1.0, True),
                 "best_test_accuracy": (0.0, 1.0, True)}
PARAMS_NOTE = ("no reading of the source gives the four published MBCliqueNet counts "
               "(docs/papers.md, 'MBCliqueNet parameter counts')")
# The reading whose four counts come closest to the published ones (largest miss smallest;
# `python tools/count_readings.py --all`). Not the default: docs/papers.md says why.
CLOSEST_READING = {"model.stage_two_kernels": "own_clique", "model.transition_kernel": 3,
                   "model.attention": True, "model.head_input": "stage2",
                   "model.compression": True}
# Values of the MBCliqueNet recipes that the source lost or never gave (docs/papers.md §3),
# by data set: (field, what the recipe's value is).
READ_VALUES = {
    "cifar10": (("schedule.min_lr", "read: the exponent is lost in the source, section 3.4: "
                 "'We change the minimum of accuracy to 1 10 .'"),),
    "tiny_imagenet_100": (
        ("data.image_size", "guessed: section 3.5 gives no image size (Tiny ImageNet's 64)"),
        ("schedule.min_lr", "guessed: section 3.5 gives none (section 3.1's 0.0001)"),
        ("train.epochs", "guessed: section 3.5 gives none (CIFAR's 256)")),
}
READ_VALUES["cifar100"] = READ_VALUES["cifar10"]


class UsageError(ValueError):
    pass


@functools.cache
def published() -> dict:
    """The published figures (`published.json`, beside this file)."""
    with open(PUBLISHED_FILE) as handle:
        return json.load(handle)




# ----------------------------------------------------------------------------- recipes


def _render(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A config file plus command-line overrides: what launch.py runs for a row."""

    config: str  # relative to the repository
    overrides: tuple[tuple[str, object], ...] = ()
    workdir: str = ""

    def load(self):
        return _load_recipe(self)

    def command(self) -> str:
        parts = ["python", "launch.py", f"--config={self.config}"]
        parts += [f"--config.{field}={_render(value)}" for field, value in self.overrides]
        parts.append(f"--workdir=results/{self.workdir}")
        return " ".join(shlex.quote(part) for part in parts)


@functools.cache
def _recipe_config(recipe: Recipe):
    name = os.path.splitext(os.path.basename(recipe.config))[0]
    config = importlib.import_module(f"cliquejax.configs.{name}").get_config()
    for field, value in recipe.overrides:
        *parents, leaf = field.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        if leaf not in node:
            raise KeyError(f"{recipe.config} has no field {field}")
        node[leaf] = value
    return config


def _load_recipe(recipe: Recipe):
    return _recipe_config(recipe).copy_and_resolve_references()


@dataclasses.dataclass(frozen=True)
class Row:
    paper: str  # a key of PAPERS
    table: str
    model: str
    dataset: str  # a key of DATASET_LABELS
    metric: str  # a key of METRICS
    published: float
    recipe: Recipe


def _cliquenet_recipe(dataset: str, k: int, T: int, family: str = "cliquenet",
                      **model) -> Recipe:
    fields = {"model.k": k, "model.T": T, **{f"model.{f}": v for f, v in model.items()}}
    slug = "_".join([family, f"k{k}", f"T{T}", *(f"{f}{v}" for f, v in model.items()),
                     dataset]).replace("+", "")
    if family == "densenet":
        data = {"cifar10": {}, "cifar100": {"data.name": "cifar100"},
                "svhn_cropped": {"data.name": "svhn_cropped", "data.svhn_extra": True,
                                 "train.epochs": 40}}[dataset]
        return Recipe("configs/densenet_cifar10.py", tuple({**fields, **data}.items()), slug)
    config = {"cifar10": "cliquenet_cifar10", "cifar100": "cliquenet_cifar100",
              "svhn_cropped": "cliquenet_svhn"}[dataset]
    return Recipe(f"configs/{config}.py", tuple(fields.items()), slug)


def _tab3_rows() -> list[Row]:
    table = published()["cliquenet"]["Tab 3"]
    rows = []
    for values in table["rows"]:
        entry = dict(zip(table["columns"], values, strict=True))
        family, k, T = entry["family"], entry["k"], entry["T"]
        name = f"{'DenseNet' if family == 'densenet' else 'CliqueNet'} (k={k}, T={T})"
        cifar10 = _cliquenet_recipe("cifar10", k, T, family)
        for metric in COUNTS:
            rows.append(Row("cliquenet", "Tab 3", name, "cifar10", metric, entry[metric],
                            cifar10))
        for dataset in ("cifar10", "cifar100", "svhn_cropped"):
            rows.append(Row("cliquenet", "Tab 3", name, dataset, "error_best", entry[dataset],
                            _cliquenet_recipe(dataset, k, T, family)))
    return rows


def _variant_rows() -> list[Row]:
    tables = published()["cliquenet"]
    rows = [Row("cliquenet", "Tab 1", f"CliqueNet ({variant})", "cifar10", "error_best", error,
                _cliquenet_recipe("cifar10", 64, 15, variant=variant))
            for variant, error in tables["Tab 1"]["cifar10"].items()]
    for dataset, errors in tables["Tab 2"].items():
        rows += [Row("cliquenet", "Tab 2", f"CliqueNet (X={x})", dataset, "error_best", error,
                     _cliquenet_recipe(dataset, 64, 15, variant="X", x=x))
                 for x, error in enumerate(errors)]
    return rows


MBCLIQUENET_CONFIGS = {"mnist": "mbclique_mnist", "svhn_cropped": "mbclique_svhn",
                       "cifar10": "mbclique_cifar10", "cifar100": "mbclique_cifar100"}


def _mbcliquenet_rows() -> list[Row]:
    tables = published()["mbcliquenet"]

    def recipe(config, slug, **overrides):
        return Recipe(f"configs/{config}.py", tuple(overrides.items()), slug)

    table1 = tables["Table 1"]
    rows = [Row("mbcliquenet", "Table 1", "MBCliqueNet", dataset, "params", value,
                recipe(MBCLIQUENET_CONFIGS[dataset], MBCLIQUENET_CONFIGS[dataset]))
            for dataset, value in table1["params"].items()]
    for dataset, config in MBCLIQUENET_CONFIGS.items():
        for model in ("MBCliqueNet", "u-MBCliqueNet"):
            if dataset not in table1[model]:
                continue
            u = model.startswith("u-")
            rows.append(Row("mbcliquenet", "Table 1", model, dataset, "accuracy_final",
                            table1[model][dataset],
                            recipe(config, f"{'u_' if u else ''}{config}",
                                   **({"model.binarize": False} if u else {}))))
    table2 = tables["Table 2"]
    for metric, key in (("params", "params"), ("accuracy_final", "accuracy")):
        rows += [Row("mbcliquenet", "Table 2", f"MBCliqueNet (K={r['K']})", "cifar10", metric,
                     r[key], recipe("mbclique_cifar10", f"mbclique_cifar10_w64_K{r['K']}",
                                    **{"model.widths": tuple(table2["widths"]),
                                       "model.K": r["K"]}))
                 for r in table2["rows"]]
    tiny = recipe("mbclique_tinyimagenet", "mbclique_tinyimagenet",
                  **{"data.path": "TINY_IMAGENET_100_DIR"})
    rows += [Row("mbcliquenet", "Sec. 3.5", "MBCliqueNet", "tiny_imagenet_100", metric, value,
                 tiny) for metric, value in tables["Sec. 3.5"].items()]
    return rows


def paper_rows(papers=None) -> list[Row]:
    """Every row, in the tables' order; `papers`: keys of PAPERS to keep (all if None)."""
    rows = _tab3_rows() + _variant_rows() + _mbcliquenet_rows()
    return [row for row in rows if papers is None or row.paper in papers]


# ----------------------------------------------------------------------------- runs


def dataset_of(flat: dict) -> str:
    """The data set a flattened config trains on (module docstring for npz and folders)."""
    name = flat.get("data.name")
    if name == "npz":
        file_name = os.path.basename(str(flat.get("data.path", ""))).lower()
        if "fashion" in file_name:
            return f"npz:{file_name}"
        for key, hint in (("cifar100", "cifar100"), ("cifar10", "cifar10"),
                          ("svhn_cropped", "svhn"), ("mnist", "mnist")):
            if hint in file_name:
                return key
        return f"npz:{file_name}"
    if name == "image_folder" and (flat.get("data.image_size"), flat.get("data.num_classes")) \
            == (64, 100):
        return "tiny_imagenet_100"
    return str(name)


@dataclasses.dataclass
class Run:
    directory: str
    config: dict  # flattened config.json
    results: dict
    model: dict = dataclasses.field(default_factory=dict)  # config.json's "model", as written

    @property
    def epochs(self) -> float:
        return float(self.results.get("epochs") or 0.0)


def _read_json(path: str):
    with open(path) as handle:
        return json.load(handle)


def _malformed(path: str, what: str) -> UsageError:
    return UsageError(f"{path}: {what}; allowed: the file launch.py writes in a run directory")


def _read_config(path: str) -> tuple[dict, dict]:
    """(flattened config, its "model" section) of a run's config.json, or UsageError."""
    try:
        tree = _read_json(path)
    except (OSError, ValueError) as error:
        raise _malformed(path, f"not readable as JSON ({error})") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
        raise _malformed(path, "not a config (no \"model\" object)")
    flat = flatten_config(tree)
    for field in ("model.name", "data.name"):
        if not isinstance(flat.get(field), str):
            raise _malformed(path, f"{field} missing or not a string")
    import ml_collections

    from cliquejax import models

    try:
        models.check(ml_collections.ConfigDict(tree["model"]))
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise _unbuildable(path, error) from None
    return flat, tree["model"]


def _unbuildable(path: str, error: Exception) -> UsageError:
    message = " ".join(str(error).split()) or type(error).__name__
    return _malformed(path, f"its model cannot be built ({message})")


def _read_results(path: str) -> dict:
    try:
        results = _read_json(path)
    except (OSError, ValueError) as error:
        raise _malformed(path, f"not readable as JSON ({error})") from None
    if not isinstance(results, dict):
        raise _malformed(path, "not a JSON object")
    for field, (low, high, nullable) in RESULT_FIELDS.items():
        value = results.get(field, ...)
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not low <= value <= high:
            shown = "missing" if value is ... else json.dumps(value)
            raise _malformed(path, f"{field} {shown} is not a number in [{low:g}, {high:g}]"
                                   + (" or null" if nullable else ""))
    return results


def find_runs(paths) -> tuple[list[Run], list[dict]]:
    """(runs, skipped): run directories among `paths` (each a run directory, or a directory
    of them), and the unfinished ones (config.json, no results.json). A malformed
    config.json or results.json raises UsageError naming the file."""
    runs, skipped = [], []
    for path in paths:
        if not os.path.isdir(path):
            raise UsageError(f"--runs {path!r} is not a directory; allowed: run directories "
                             "written by launch.py, or directories holding them")
        if os.path.isfile(os.path.join(path, "config.json")):
            candidates = [path]
        else:
            candidates = sorted(os.path.join(path, entry) for entry in os.listdir(path)
                                if os.path.isfile(os.path.join(path, entry, "config.json")))
        for directory in candidates:
            config, model = _read_config(os.path.join(directory, "config.json"))
            results_path = os.path.join(directory, "results.json")
            if not os.path.exists(results_path):
                skipped.append({"dir": directory, "reason": "no results.json (unfinished run)"})
                continue
            runs.append(Run(directory, config, _read_results(results_path), model))
    return runs, skipped


@functools.cache
def _recipe_flat(recipe: Recipe) -> dict:
    return flatten_config(json.loads(_recipe_config(recipe).to_json_best_effort()))


_ABSENT = object()


def _run_value(config: dict, field: str):
    """The run's value of `field`; for a config.json without it, the value in force before
    the field existed (`run_dir.absent_value`: what resume reads too)."""
    from cliquejax.train import run_dir  # imported here: this module starts fast

    if field in config:
        return config[field]
    value = run_dir.absent_value(config, field)
    return _ABSENT if value == run_dir.ABSENT else value


def _change(field: str, run_config: dict, theirs, ours) -> str:
    recipe = f"recipe: {'absent' if ours is _ABSENT else json.dumps(ours)}"
    if theirs is _ABSENT:
        return f"{field} absent ({recipe})"
    if field not in run_config:
        return f"{field}={json.dumps(theirs)} (absent: the default before the field existed; " \
               f"{recipe})"
    return f"{field}={json.dumps(theirs)} ({recipe})"


def _scaled(value, ratio):
    return value * ratio if isinstance(value, (int, float)) else value


def batch_change(run_config: dict, recipe: dict) -> tuple[list[str], list[str]] | None:
    """None if the run keeps the recipe's batch size; else (scale changes, other changes):
    the batch with the rates of LR_FIELDS scaled by the linear rule is scale; at any other
    rates the batch change and the rates are other changes."""
    theirs, ours = _run_value(run_config, BATCH), recipe.get(BATCH, _ABSENT)
    if theirs == ours or not all(isinstance(v, int) and v > 0 for v in (theirs, ours)):
        return None
    ratio = theirs / ours
    rates = {field: (_run_value(run_config, field), _scaled(recipe.get(field, _ABSENT), ratio))
             for field in LR_FIELDS}
    follows = all(isinstance(have, (int, float)) and isinstance(want, (int, float))
                  and math.isclose(have, want, rel_tol=1e-6, abs_tol=1e-12)
                  for have, want in rates.values())
    shown = _change(BATCH, run_config, theirs, ours)
    if follows:
        scaled = ", ".join(f"{field}={json.dumps(have)}" for field, (have, _) in rates.items())
        return [f"{shown} with {scaled} (the recipe's x {ratio:g}: the linear rule)"], []
    want = ", ".join(f"{field}={json.dumps(w)}" for field, (_, w) in rates.items())
    other = [f"{shown} without the learning rates the linear rule gives it ({want})"]
    other += [_change(field, run_config, have, recipe.get(field, _ABSENT))
              for field, (have, _) in rates.items() if have != recipe.get(field, _ABSENT)]
    return [], other


def too_short(run: Run, recipe: dict) -> str | None:
    """Why a run of an SGDR recipe is not the row's: it trained less than the first cycle
    (so it never reached the minimum rate). None otherwise."""
    if recipe.get("schedule.name") != "sgdr":
        return None
    first = float(recipe.get("schedule.first_period_epochs", 0.0))
    if run.epochs >= first:
        return None
    return (f"trained {run.epochs:g} epochs, less than one SGDR cycle ({first:g} epochs): "
            "it never reaches the recipe's minimum rate")


@dataclasses.dataclass(frozen=True)
class Differences:
    scale: tuple[str, ...]  # SCALE fields: a reduced run of the row
    other: tuple[str, ...]  # anything else: another run, not the row's


def differences(row: Row, run: Run) -> Differences | None:
    """None if `run` is not of `row`'s model and data set; else what it changes."""
    recipe = _recipe_flat(row.recipe)
    if dataset_of(run.config) != row.dataset:
        return None
    family = recipe["model.name"]
    if any(_run_value(run.config, field) != recipe.get(field) for field in IDENTITY[family]):
        return None
    scale, other = [], []
    skipped = set(NOT_COMPARED) | set(IDENTITY[family])
    batch = batch_change(run.config, recipe)
    if batch is not None:
        scale, other = batch
        skipped |= {BATCH, *LR_FIELDS}
    short = too_short(run, recipe)
    if short is not None:
        other.append(short)
    for field in sorted((set(recipe) | set(run.config)) - skipped):
        theirs, ours = _run_value(run.config, field), recipe.get(field, _ABSENT)
        if theirs != ours:
            change = _change(field, run.config, theirs, ours)
            (scale if field in SCALE else other).append(change)
    return Differences(tuple(scale), tuple(other))


def _candidates(row: Row, runs: list[Run]):
    return [(run, diff) for run in runs if (diff := differences(row, run)) is not None]


def match(row: Row, runs: list[Run]):
    """(run, scale changes) of the run that best reproduces `row`, or None: only a run that
    changes nothing but scale is the row's."""
    matched = [(run, list(diff.scale)) for run, diff in _candidates(row, runs)
               if not diff.other]
    if not matched:
        return None
    return min(matched, key=lambda m: (len(m[1]) > 0, len(m[1]), -m[0].epochs, m[0].directory))


def other_runs(row: Row, runs: list[Run]) -> list[tuple[Run, list[str]]]:
    """Runs of the row's model and data set that change more than its scale."""
    return [(run, list(diff.scale + diff.other)) for run, diff in _candidates(row, runs)
            if diff.other]


# ----------------------------------------------------------------------------- rows


def _counts_of(config) -> tuple[int, int]:
    from cliquejax import summary

    return summary.counts(config)


@functools.cache
def _counts(recipe: Recipe) -> tuple[int, int]:
    return _counts_of(recipe.load())


@functools.cache
def _model_counts(recipe: Recipe, model_json: str) -> tuple[int, int]:
    """(params, FLOPs) of the network of a run's config.json "model" on the recipe's data."""
    import ml_collections

    config = recipe.load()
    config.model = ml_collections.ConfigDict(json.loads(model_json))
    return _counts_of(config)


def run_counts(row: Row, run: Run) -> tuple[int, int]:
    """The run's own network's (params, FLOPs), or UsageError naming its config.json."""
    try:
        return _model_counts(row.recipe, json.dumps(run.model, sort_keys=True))
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise _unbuildable(os.path.join(run.directory, "config.json"), error) from None


def _percent(fraction):
    return None if fraction is None else round(100.0 * float(fraction), 2)


def _ours(row: Row, params: int | None, flops: int | None, found) -> float | None:
    if row.metric == "params":
        return None if params is None else round(params / 1e6, 2)
    if row.metric == "flops":
        return None if flops is None else round(flops / 1e9, 2)
    if found is None or row.metric == "top5_final":  # launch.py records no top-5
        return None
    results = found[0].results
    if row.metric == "error_best":
        best = results["best_test_accuracy"]
        return None if best is None else round(100.0 - 100.0 * float(best), 2)
    return _percent(results["final_test_accuracy"])


def _display_dir(directory: str) -> str:
    relative = os.path.relpath(os.path.abspath(directory), REPO_ROOT)
    return directory if relative.startswith("..") else relative


def build_rows(rows: list[Row], runs: list[Run], counts: bool = True) -> list[dict]:
    """The JSON rows: published against ours, with the row's run (if any) and the size of
    the network "ours" was measured on (the run's, else the recipe's)."""
    out = []
    for row in rows:
        found = None if row.metric in COUNTS else match(row, runs)
        run, counted_for, params, flops = None, "recipe", None, None
        if counts:
            params, flops = _counts(row.recipe)
        if found is not None:
            matched, changed = found
            run = {"dir": _display_dir(matched.directory), "reduced": bool(changed),
                   "differences": changed,
                   "final_test_accuracy": _percent(matched.results["final_test_accuracy"]),
                   "best_test_accuracy": _percent(matched.results["best_test_accuracy"]),
                   "epochs": matched.results["epochs"]}
            if counts and changed:
                params, flops = run_counts(row, matched)
                counted_for = "run"
        entry = {
            "paper": PAPERS[row.paper], "table": row.table, "model": row.model,
            "dataset": DATASET_LABELS[row.dataset], "metric": METRICS[row.metric],
            "published": row.published, "ours": _ours(row, params, flops, found), "run": run,
            "other_runs": [{"dir": _display_dir(r.directory), "differences": d}
                           for r, d in ([] if row.metric in COUNTS else other_runs(row, runs))],
            "params": params, "flops": flops, "counted_for": counted_for,
            "command": row.recipe.command()}
        if row.paper == "mbcliquenet" and row.metric == "params" and entry["ours"] is not None:
            entry["off_by"] = round(entry["ours"] - row.published, 2)
            entry["note"] = PARAMS_NOTE
            closest = dataclasses.replace(row.recipe, overrides=row.recipe.overrides + tuple(
                CLOSEST_READING.items()))
            entry["closest_reading"] = {"fields": CLOSEST_READING,
                                        "params": _counts(closest)[0]}
        if row.paper == "mbcliquenet" and row.metric.startswith("accuracy"):
            entry["ours_best"] = (None if found is None else
                                  _percent(found[0].results["best_test_accuracy"]))
        if row.paper == "mbcliquenet" and row.metric not in COUNTS:
            recipe = _recipe_flat(row.recipe)
            entry["read_values"] = [f"{field}={json.dumps(recipe[field])}: {why}"
                                    for field, why in READ_VALUES.get(row.dataset, ())]
        out.append(entry)
    return out


def unmatched(rows: list[Row], runs: list[Run]) -> list[dict]:
    used = {id(run) for row in rows if row.metric not in COUNTS
            for run, _ in _candidates(row, runs)}
    return [{"dir": _display_dir(run.directory), "model": run.config.get("model.name"),
             "dataset": dataset_of(run.config), "reason": "matches no row"}
            for run in runs if id(run) not in used]


# ----------------------------------------------------------------------------- output


def _number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _run_text(entry: dict) -> str:
    if entry["metric"] in (METRICS["params"], METRICS["flops"]):
        if "off_by" in entry:
            closest = entry["closest_reading"]["params"] / 1e6
            return (f"counted now: {entry['off_by']:+.2f}M off, the closest reading "
                    f"{closest:.2f}M; {entry['note']}")
        return "counted now"
    run = entry["run"]
    read = "".join(f" [{value}]" for value in entry.get("read_values", ()))
    if run is None:
        return "not run" + read
    if entry["metric"] == METRICS["top5_final"]:
        return f"{run['dir']}: top-5 not recorded" + read
    best = ("" if entry.get("ours_best") is None else
            f" (best epoch: {entry['ours_best']:.2f})")
    if not run["reduced"]:
        return run["dir"] + best + read
    return (f"{run['dir']}{best}, reduced run (params, FLOPs: its own): "
            f"{'; '.join(run['differences'])}" + read)


def format_tables(entries: list[dict], extra: list[dict]) -> str:
    lines = []
    for (paper, table), title in TABLE_TITLES.items():
        group = [e for e in entries if (e["paper"], e["table"]) == (PAPERS[paper], table)]
        if not group:
            continue
        lines += ["", f"{PAPERS[paper]}, {table}: {title}",
                  f"{'model':<24}{'data set':<19}{'metric':<31}{'published':>10}{'ours':>8}"
                  f"{'params':>9}{'FLOPs':>9}  run"]
        others = []
        for e in group:
            size = (f"{_number(e['params'] and e['params'] / 1e6)}M".rjust(9)
                    + f"{_number(e['flops'] and e['flops'] / 1e9)}G".rjust(9))
            lines.append(f"{e['model']:<24}{e['dataset']:<19}{e['metric']:<31}"
                         f"{_number(e['published']):>10}{_number(e['ours']):>8}{size}  "
                         f"{_run_text(e)}")
            others += [f"  {o['dir']} ({e['model']}, {e['dataset']}): "
                       f"{'; '.join(o['differences'])}" for o in e["other_runs"]]
        if others:
            lines.append("other runs (not the paper's setting, not shown as ours):")
            lines += list(dict.fromkeys(others))
    for item in extra:
        lines.append(f"run {item['dir']} not shown: {item['reason']}")
    return "\n".join(lines).lstrip("\n")


def format_commands(entries: list[dict]) -> str:
    """Each distinct command once, after a comment naming the rows it produces."""
    by_command: dict[str, dict[str, list[str]]] = {}
    for e in entries:
        rows = by_command.setdefault(e["command"], {})
        rows.setdefault(f"{e['paper']} {e['table']}: {e['model']} on {e['dataset']}",
                        []).append(e["metric"])
    lines = []
    for command, rows in by_command.items():
        names = "; ".join(f"{name} ({', '.join(metrics)})" for name, metrics in rows.items())
        lines += [f"# {names}", command]
    return "\n".join(lines)


def main(argv=None) -> int:
    from cliquejax.standalone import OneLineParser

    parser = OneLineParser(prog="python -m cliquejax.reproduce",
                           description="The papers' tables: published figures against ours.")
    parser.add_argument("--runs", nargs="+", metavar="DIR", default=None,
                        help="run directories, or directories holding them "
                             "(default: every run under results/)")
    parser.add_argument("--json", action="store_true", help='print {"rows": [...]}')
    parser.add_argument("--commands", action="store_true",
                        help="print the launch.py command of every row")
    parser.add_argument("--paper", choices=sorted(PAPERS), action="append",
                        help="only this paper's rows (repeatable)")
    args = parser.parse_args(argv)
    rows = paper_rows(args.paper)
    if args.commands:
        print(format_commands(build_rows(rows, [], counts=False)))
        return 0
    paths = args.runs if args.runs is not None else (
        [DEFAULT_RUNS] if os.path.isdir(DEFAULT_RUNS) else [])
    try:
        runs, skipped = find_runs(paths)
        entries = build_rows(rows, runs)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    extra = unmatched(rows, runs) + skipped
    if args.json:
        print(json.dumps({"rows": entries, "unmatched_runs": extra}))
    else:
        print(format_tables(entries, extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
