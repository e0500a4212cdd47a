"""The papers' tables, published against ours:

    python -m cliquejax.reproduce                      # tables: published | ours | run
    python -m cliquejax.reproduce --runs DIR [DIR ...] # accuracies from these run directories
    python -m cliquejax.reproduce --json               # {"rows": [...], "unmatched_runs": [...]}
    python -m cliquejax.reproduce --commands           # the launch.py command of every row
    python -m cliquejax.reproduce --paper=mbcliquenet  # one paper's rows only

Rows: CliqueNet (Yang et al., CVPR 2018; table numbers of the authors' README) Tab 3
(parameters, FLOPs and test errors of CliqueNet and its DenseNet baselines on CIFAR-10,
CIFAR-100 and SVHN without augmentation), Tab 1 (the I+I / I+II / II+II variants) and Tab 2
(Stage-II updates of only the first X layers); MBCliqueNet Table 1 (accuracy of
MBCliqueNet and, bracketed there, u-MBCliqueNet), Table 2 (the K ablation) and the Tiny
ImageNet result of its Sec. 3.5. Each row is one published figure, in the papers' own
terms: CliqueNet prints test error % (the best epoch's, the original code's report),
MBCliqueNet accuracy % (we report the final epoch's; the paper does not say which).

Parameters and FLOPs of ours are counted now by `cliquejax.summary` (shapes only, nothing
trained or allocated). Accuracies come from run directories written by launch.py
(config.json, results.json): `--runs` takes run directories or directories holding them,
by default every directory under the repository's `results/`.

A run matches a row when its config.json has the row's model (model.name and the fields
that make it that row: k, T, variant, x, attention, bottleneck, compression for CliqueNet;
k, T for DenseNet; binarize, K for MBCliqueNet) on the row's data set. Every other field
that differs from the row's recipe (widths, layers, epochs, batch size, schedule...) is
listed, and the run is shown as a reduced run of the row; bookkeeping fields (seed, data
directory and path, logging, checkpointing, evaluation batch, remat, unroll, workers) are
not compared, nor fields one side lacks (a run written before the field existed). The data
set of an `npz` run is read from its file name: one containing "cifar100", "cifar10",
"svhn" or "mnist" (but not "fashion") is that data set; an `image_folder` of 64 x 64 images
and 100 classes is the 100-class Tiny ImageNet. When several runs match a row, the
full-recipe one wins, then the one with fewest differences, then the most epochs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import shlex
import sys


def flatten_config(tree: dict) -> dict:
    """A nested config dict as {"model.k": 36, ...} (imported here: this module starts fast)."""
    from cliquejax.train.run_dir import flatten

    return flatten(tree)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RUNS = os.path.join(REPO_ROOT, "results")

PAPERS = {"cliquenet": "CliqueNet (CVPR 2018)", "mbcliquenet": "MBCliqueNet"}
DATASET_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn_cropped": "SVHN",
                  "mnist": "MNIST", "tiny_imagenet_100": "Tiny ImageNet-100"}
TABLE_TITLES = {
    ("cliquenet", "Tab 3"): "main results on CIFAR and SVHN without data augmentation",
    ("cliquenet", "Tab 1"): "block feature / transit feature variants (k=64, T=15)",
    ("cliquenet", "Tab 2"): "Stage-II update of only the first X layers (k=64, T=15)",
    ("mbcliquenet", "Table 1"): "classification accuracy; u-MBCliqueNet is bracketed there",
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
IDENTITY = {  # the fields that make a run a run of the row (besides the data set)
    "cliquenet": ("model.name", "model.k", "model.T", "model.variant", "model.x",
                  "model.attention", "model.bottleneck", "model.compression"),
    "densenet": ("model.name", "model.k", "model.T"),
    "mbcliquenet": ("model.name", "model.binarize", "model.K"),
}
NOT_COMPARED = ("seed", "data.name", "data.data_dir", "data.path", "data.worker_count",
                "train.log_every_steps", "train.eval_every_epochs",
                "train.checkpoint_every_epochs", "train.keep_checkpoints",
                "train.eval_batch_size", "train.remat", "model.unroll")


class UsageError(ValueError):
    pass


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
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)  # config files import `configs.default`
    name = os.path.splitext(os.path.basename(recipe.config))[0]
    config = importlib.import_module(f"configs.{name}").get_config()
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
    rows = []
    published = [  # family, k, T, FLOPs (G), params (M), CIFAR-10, CIFAR-100, SVHN error %
        ("densenet", 12, 36, 0.53, 1.0, 7.00, 27.55, 1.79),
        ("densenet", 12, 96, 3.54, 7.0, 5.77, 23.79, 1.67),
        ("densenet", 24, 96, 13.78, 27.2, 5.83, 23.42, 1.59),
        ("cliquenet", 36, 12, 0.91, 0.94, 5.93, 27.32, 1.77),
        ("cliquenet", 64, 15, 4.21, 4.49, 5.12, 23.98, 1.62),
        ("cliquenet", 80, 15, 6.45, 6.94, 5.10, 23.32, 1.56),
        ("cliquenet", 80, 18, 9.45, 10.14, 5.06, 23.14, 1.51),
    ]
    for family, k, T, flops, params, *errors in published:
        name = f"{'DenseNet' if family == 'densenet' else 'CliqueNet'} (k={k}, T={T})"
        cifar10 = _cliquenet_recipe("cifar10", k, T, family)
        rows.append(Row("cliquenet", "Tab 3", name, "cifar10", "params", params, cifar10))
        rows.append(Row("cliquenet", "Tab 3", name, "cifar10", "flops", flops, cifar10))
        for dataset, error in zip(("cifar10", "cifar100", "svhn_cropped"), errors, strict=True):
            rows.append(Row("cliquenet", "Tab 3", name, dataset, "error_best", error,
                            _cliquenet_recipe(dataset, k, T, family)))
    return rows


def _variant_rows() -> list[Row]:
    rows = [Row("cliquenet", "Tab 1", f"CliqueNet ({variant})", "cifar10", "error_best", error,
                _cliquenet_recipe("cifar10", 64, 15, variant=variant))
            for variant, error in (("I+I", 6.64), ("I+II", 6.10), ("II+II", 5.76))]
    cifar10 = (5.83, 5.63, 5.54, 5.41, 5.20, 5.12)
    cifar100 = (24.79, 24.65, 24.37, 23.75, 24.04, 23.73)
    for dataset, errors in (("cifar10", cifar10), ("cifar100", cifar100)):
        rows += [Row("cliquenet", "Tab 2", f"CliqueNet (X={x})", dataset, "error_best", error,
                     _cliquenet_recipe(dataset, 64, 15, variant="X", x=x))
                 for x, error in enumerate(errors)]
    return rows


def _mbcliquenet_rows() -> list[Row]:
    def recipe(config, slug, **overrides):
        return Recipe(f"configs/{config}.py", tuple(overrides.items()), slug)

    u = {"model.binarize": False}
    rows = [
        Row("mbcliquenet", "Table 1", "MBCliqueNet", "mnist", "accuracy_final", 99.63,
            recipe("mbclique_mnist", "mbclique_mnist")),
        Row("mbcliquenet", "Table 1", "MBCliqueNet", "svhn_cropped", "accuracy_final", 97.21,
            recipe("mbclique_svhn", "mbclique_svhn")),
        Row("mbcliquenet", "Table 1", "MBCliqueNet", "cifar10", "accuracy_final", 95.72,
            recipe("mbclique_cifar10", "mbclique_cifar10")),
        Row("mbcliquenet", "Table 1", "u-MBCliqueNet", "cifar10", "accuracy_final", 95.78,
            recipe("mbclique_cifar10", "u_mbclique_cifar10", **u)),
        Row("mbcliquenet", "Table 1", "MBCliqueNet", "cifar100", "accuracy_final", 80.43,
            recipe("mbclique_cifar100", "mbclique_cifar100")),
        Row("mbcliquenet", "Table 1", "u-MBCliqueNet", "cifar100", "accuracy_final", 80.69,
            recipe("mbclique_cifar100", "u_mbclique_cifar100", **u)),
    ]
    rows += [Row("mbcliquenet", "Table 2", f"MBCliqueNet (K={K})", "cifar10", "accuracy_final",
                 accuracy, recipe("mbclique_cifar10", f"mbclique_cifar10_w64_K{K}",
                                  **{"model.widths": (64, 64, 128), "model.K": K}))
             for K, accuracy in ((2, 95.17), (4, 95.03), (8, 94.89))]
    tiny = recipe("mbclique_tinyimagenet", "mbclique_tinyimagenet",
                  **{"data.path": "TINY_IMAGENET_100_DIR"})
    rows += [Row("mbcliquenet", "Sec. 3.5", "MBCliqueNet", "tiny_imagenet_100", metric, value,
                 tiny) for metric, value in (("accuracy_final", 83.07), ("top5_final", 96.51))]
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

    @property
    def epochs(self) -> float:
        return float(self.results.get("epochs") or 0.0)


def _read_json(path: str):
    with open(path) as handle:
        return json.load(handle)


def find_runs(paths) -> tuple[list[Run], list[dict]]:
    """(runs, skipped): run directories among `paths` (each a run directory, or a directory
    of them), and the directories that hold a config.json but cannot be used, with why."""
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
            try:
                config = flatten_config(_read_json(os.path.join(directory, "config.json")))
            except (OSError, ValueError) as error:
                skipped.append({"dir": directory, "reason": f"config.json unreadable: {error}"})
                continue
            try:
                results = _read_json(os.path.join(directory, "results.json"))
            except FileNotFoundError:
                skipped.append({"dir": directory, "reason": "no results.json (unfinished run)"})
                continue
            except (OSError, ValueError) as error:
                skipped.append({"dir": directory, "reason": f"results.json unreadable: {error}"})
                continue
            runs.append(Run(directory, config, results))
    return runs, skipped


@functools.cache
def _recipe_flat(recipe: Recipe) -> dict:
    return flatten_config(json.loads(_recipe_config(recipe).to_json_best_effort()))


def differences(row: Row, run: Run) -> list[str] | None:
    """None if `run` is not a run of `row`; else the recipe fields it changes."""
    recipe = _recipe_flat(row.recipe)
    if dataset_of(run.config) != row.dataset:
        return None
    family = recipe["model.name"]
    if any(run.config.get(field) != recipe.get(field) for field in IDENTITY[family]):
        return None
    changed = []
    for field in sorted(set(recipe) & set(run.config)):
        if field in NOT_COMPARED or field in IDENTITY[family]:
            continue
        if run.config[field] != recipe[field]:
            changed.append(f"{field}={json.dumps(run.config[field])} "
                           f"(recipe: {json.dumps(recipe[field])})")
    return changed


def match(row: Row, runs: list[Run]):
    """(run, differences) of the run that best reproduces `row`, or None."""
    matched = [(run, diff) for run in runs if (diff := differences(row, run)) is not None]
    if not matched:
        return None
    return min(matched, key=lambda m: (len(m[1]) > 0, len(m[1]), -m[0].epochs, m[0].directory))


# ----------------------------------------------------------------------------- rows


@functools.cache
def _counts(recipe: Recipe) -> tuple[int, int]:
    from cliquejax import summary

    return summary.counts(recipe.load())


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
        best = results.get("best_test_accuracy")
        return None if best is None else round(100.0 - 100.0 * float(best), 2)
    return _percent(results.get("final_test_accuracy"))


def _display_dir(directory: str) -> str:
    relative = os.path.relpath(os.path.abspath(directory), REPO_ROOT)
    return directory if relative.startswith("..") else relative


def build_rows(rows: list[Row], runs: list[Run], counts: bool = True) -> list[dict]:
    """The JSON rows: published against ours, with the matched run and our model's size."""
    out = []
    for row in rows:
        params, flops = _counts(row.recipe) if counts else (None, None)
        found = None if row.metric in ("params", "flops") else match(row, runs)
        run = None
        if found is not None:
            matched, changed = found
            run = {"dir": _display_dir(matched.directory), "reduced": bool(changed),
                   "differences": changed,
                   "final_test_accuracy": _percent(matched.results.get("final_test_accuracy")),
                   "best_test_accuracy": _percent(matched.results.get("best_test_accuracy")),
                   "epochs": matched.results.get("epochs")}
        out.append({
            "paper": PAPERS[row.paper], "table": row.table, "model": row.model,
            "dataset": DATASET_LABELS[row.dataset], "metric": METRICS[row.metric],
            "published": row.published, "ours": _ours(row, params, flops, found), "run": run,
            "params": params, "flops": flops, "command": row.recipe.command()})
    return out


def unmatched(rows: list[Row], runs: list[Run]) -> list[dict]:
    used = {id(found[0]) for row in rows if row.metric not in ("params", "flops")
            and (found := match(row, runs)) is not None}
    return [{"dir": _display_dir(run.directory), "model": run.config.get("model.name"),
             "dataset": dataset_of(run.config), "reason": "matches no row"}
            for run in runs if id(run) not in used]


# ----------------------------------------------------------------------------- output


def _number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _run_text(entry: dict) -> str:
    if entry["metric"] in (METRICS["params"], METRICS["flops"]):
        return "counted now"
    run = entry["run"]
    if run is None:
        return "not run"
    if entry["metric"] == METRICS["top5_final"]:
        return f"{run['dir']}: top-5 not recorded"
    if not run["reduced"]:
        return run["dir"]
    return f"{run['dir']}, reduced run: {'; '.join(run['differences'])}"


def format_tables(entries: list[dict], extra: list[dict]) -> str:
    lines = []
    for (paper, table), title in TABLE_TITLES.items():
        group = [e for e in entries if (e["paper"], e["table"]) == (PAPERS[paper], table)]
        if not group:
            continue
        lines += ["", f"{PAPERS[paper]}, {table}: {title}",
                  f"{'model':<24}{'data set':<19}{'metric':<31}{'published':>10}{'ours':>8}"
                  f"{'params':>9}{'FLOPs':>9}  run"]
        for e in group:
            size = (f"{_number(e['params'] and e['params'] / 1e6)}M".rjust(9)
                    + f"{_number(e['flops'] and e['flops'] / 1e9)}G".rjust(9))
            lines.append(f"{e['model']:<24}{e['dataset']:<19}{e['metric']:<31}"
                         f"{_number(e['published']):>10}{_number(e['ours']):>8}{size}  "
                         f"{_run_text(e)}")
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
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    entries = build_rows(rows, runs)
    extra = unmatched(rows, runs) + skipped
    if args.json:
        print(json.dumps({"rows": entries, "unmatched_runs": extra}))
    else:
        print(format_tables(entries, extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
