"""Count MBCliqueNet's parameters under every reading of the source, for the four published
counts (docs/papers.md, "MBCliqueNet parameter counts"):

    python tools/count_readings.py          # the default and each field changed alone
    python tools/count_readings.py --all    # every combination, closest first

Each reading is a set of `config.model` fields (`cliquejax/models/mbcliquenet.py`); each count
is the real model's parameter tree built with `jax.eval_shape` (nothing allocated), every
trainable variable counted as `cliquejax.summary` counts it. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cliquejax import clique, reproduce, summary  # noqa: E402
from cliquejax.models import mbcliquenet  # noqa: E402

# Each field's values; the first is the default of the MBCliqueNet configs.
READINGS = {
    "clique_conv": mbcliquenet.CLIQUE_CONVS,
    "stage_two_kernels": clique.STAGE_TWO_KERNELS,
    "transition_kernel": (1, 3),
    "transition_width": mbcliquenet.TRANSITION_WIDTHS,
    "attention": (False, True),
    "head_input": mbcliquenet.HEAD_INPUTS,
    "compression": (False, True),
}
DEFAULT = {field: values[0] for field, values in READINGS.items()}


def settings() -> list[tuple[str, reproduce.Recipe, float]]:
    """(label, recipe, published M) of the published MBCliqueNet parameter counts."""
    rows = [row for row in reproduce.paper_rows(["mbcliquenet"]) if row.metric == "params"]
    label = lambda row: row.table + (f", {row.model.split('(')[1][:-1]}" if "(" in row.model
                                     else "")
    return [(label(row), row.recipe, row.published) for row in rows]


def count(recipe: reproduce.Recipe, fields: dict) -> int:
    config = recipe.load()
    config.model.update(fields)
    return summary.param_count(config)


def readings(everything: bool) -> list[dict]:
    if everything:
        return [dict(zip(READINGS, values, strict=True))
                for values in itertools.product(*READINGS.values())]
    return [DEFAULT] + [{**DEFAULT, field: value} for field, values in READINGS.items()
                        for value in values[1:]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every combination, closest first")
    args = parser.parse_args(argv)
    columns = settings()
    rows = []
    for fields in readings(args.all):
        counts = [count(recipe, fields) / 1e6 for _, recipe, _ in columns]
        worst = max(abs(c - published) for c, (_, _, published) in zip(counts, columns,
                                                                        strict=True))
        changed = ", ".join(f"{k}={v}" for k, v in fields.items() if v != DEFAULT[k])
        rows.append((worst, changed or "default", counts))
    if args.all:
        rows.sort(key=lambda row: row[0])
    print("| reading | " + " | ".join(f"{label} ({published}M)" for label, _, published
                                       in columns) + " | largest miss |")
    print("|---" * (len(columns) + 2) + "|")
    for worst, name, counts in rows:
        print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in counts) + f" | {worst:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
