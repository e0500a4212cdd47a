"""`python -m cliquejax.reproduce`: the papers' rows, our counts, runs matched from their
config.json / results.json (the files launch.py writes), and the rows' commands."""

import json
import os
import shlex
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from cliquejax import reproduce, summary
from cliquejax.train import run_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
README_COMMAND = "python -m cliquejax.reproduce --paper=mbcliquenet"  # run below, as written
ROW_KEYS = {"paper", "table", "model", "dataset", "metric", "published", "ours", "run"}


def write_run(directory, recipe_config, results, **overrides):
    """A run directory as launch.py leaves it: config.json by its own writer, results.json
    with accuracies as fractions."""
    config = recipe_config.copy_and_resolve_references()
    for field, value in overrides.items():
        *sections, name = field.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[name] = value
    os.makedirs(directory)
    run_dir.write_config(config, str(directory))
    with open(os.path.join(directory, "results.json"), "w") as handle:
        json.dump(results, handle)


def recipe_of(rows, model, dataset):
    return next(r.recipe for r in rows if (r.model, r.dataset) == (model, dataset))


@pytest.fixture(scope="module")
def mbcliquenet_report(tmp_path_factory):
    """`--json --paper=mbcliquenet --runs DIR` over four hand-made run directories."""
    runs = tmp_path_factory.mktemp("results")
    rows = reproduce.paper_rows(["mbcliquenet"])
    mnist = recipe_of(rows, "MBCliqueNet", "mnist").load()
    # the reduced MNIST row of this machine: the npz source, half the widths, 8 epochs
    write_run(runs / "mbclique_mnist_w32", mnist,
              {"final_test_accuracy": 0.9935, "best_test_accuracy": 0.9941, "epochs": 8.0},
              **{"data.name": "npz", "data.path": "/data/mnist.npz",
                 "model.widths": (32, 32, 64), "train.epochs": 8, "seed": 3})
    u_cifar = recipe_of(rows, "u-MBCliqueNet", "cifar10").load()
    write_run(runs / "u_cifar10", u_cifar,
              {"final_test_accuracy": 0.9577, "best_test_accuracy": 0.958, "epochs": 256.0})
    other = reproduce.paper_rows(["cliquenet"])[0].recipe.load()
    write_run(runs / "densenet_small", other,
              {"final_test_accuracy": 0.5, "best_test_accuracy": 0.5, "epochs": 1.0},
              **{"model.k": 4})
    os.makedirs(runs / "unfinished")
    run_dir.write_config(mnist, str(runs / "unfinished"))
    return runs, run_json(["--json", "--paper=mbcliquenet", "--runs", str(runs)])


def run_json(argv):
    out = StringIO()
    with redirect_stdout(out):
        assert reproduce.main(argv) == 0
    return json.loads(out.getvalue())


def test_json_rows_have_the_published_and_our_columns(mbcliquenet_report):
    _, report = mbcliquenet_report
    rows = report["rows"]
    assert len(rows) == len(reproduce.paper_rows(["mbcliquenet"])) == 15
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert isinstance(row["published"], float) and row["params"] > 0 and row["flops"] > 0
        assert row["run"] is None or {"dir", "reduced", "differences"} <= set(row["run"])
        assert row["ours"] is None or 0 < row["ours"] <= 100
    published = {(r["table"], r["model"], r["dataset"]): r["published"] for r in rows
                 if r["metric"].startswith("test accuracy")}
    assert published[("Table 1", "MBCliqueNet", "MNIST")] == 99.63
    assert published[("Table 1", "u-MBCliqueNet", "CIFAR-100")] == 80.69
    assert published[("Table 2", "MBCliqueNet (K=8)", "CIFAR-10")] == 94.89
    not_run = [r for r in rows if r["run"] is None and not r["metric"].startswith("params")]
    assert not_run and all(r["ours"] is None for r in not_run)


def test_reduced_mnist_run_is_matched_and_flagged(mbcliquenet_report):
    _, report = mbcliquenet_report
    mnist = next(r for r in report["rows"] if r["dataset"] == "MNIST")
    assert mnist["ours"] == 99.35  # final-epoch accuracy, in percent as the paper prints it
    assert mnist["run"]["dir"].endswith("mbclique_mnist_w32") and mnist["run"]["reduced"]
    changed = " ".join(mnist["run"]["differences"])
    assert "model.widths=[32, 32, 64] (recipe: [64, 64, 128])" in changed
    assert "train.epochs=8 (recipe: 32)" in changed
    assert "data." not in changed and "seed" not in changed  # bookkeeping is not compared
    # the params and FLOPs beside it are the reduced run's own network's, not the recipe's
    rows = reproduce.paper_rows(["mbcliquenet"])
    reduced = recipe_of(rows, "MBCliqueNet", "mnist").load()
    reduced.model.widths = (32, 32, 64)
    assert (mnist["params"], mnist["flops"]) == summary.counts(reduced)
    assert mnist["counted_for"] == "run" and mnist["params"] < 0.2e6


# The reduced MNIST run trained before the MBCliqueNet configs took Nesterov momentum and
# the latent clip (docs/papers.md, "MBCliqueNet training rule"): another run of the row now.
COMMITTED_RUN = REPO_ROOT / "results" / "mbclique_mnist_w32_momentum_noclip"


def under_todays_rule(config):
    """A committed run's config.json as the MBCliqueNet configs train today."""
    config["optimizer"].update(nesterov=True, clip_latent=True)


def copy_of_committed_run(directory, edit, results=None):
    """COMMITTED_RUN's config.json and results.json, the config put under today's training
    rule and then edited by `edit`, the results updated with `results`."""
    config = json.loads((COMMITTED_RUN / "config.json").read_text())
    under_todays_rule(config)
    edit(config)
    os.makedirs(directory)
    (directory / "config.json").write_text(json.dumps(config))
    measured = json.loads((COMMITTED_RUN / "results.json").read_text())
    (directory / "results.json").write_text(json.dumps({**measured, **(results or {})}))
    return directory


def mnist_row(runs):
    report = run_json(["--json", "--paper=mbcliquenet", "--runs", str(runs)])
    return next(r for r in report["rows"] if r["dataset"] == "MNIST"
                and r["metric"].startswith("test accuracy"))


@pytest.mark.parametrize("edit, shown", [
    (lambda c: c["optimizer"].update(lr=0.05), "optimizer.lr=0.05 (recipe: 0.1)"),
    (lambda c: c["schedule"].pop("sgdr_restarts"),
     'schedule.sgdr_restarts="summed" (absent: the default before the field existed; '
     'recipe: "doubling")'),
    (lambda c: c["model"].update(head_input="stage2"),
     'model.head_input="stage2" (recipe: "x0_and_stage2")'),
], ids=["learning-rate", "no-sgdr-restarts", "another-reading"])
def test_a_run_that_changes_more_than_scale_is_not_the_rows(tmp_path, edit, shown):
    """A copy of the committed MNIST run is the MNIST row's run; changed in anything but
    scale (or written before a field whose default then differs), it is listed as another
    run of the row and "ours" stays empty."""
    copy_of_committed_run(tmp_path / "same", lambda config: None)
    assert mnist_row(tmp_path)["ours"] == 99.38
    changed = copy_of_committed_run(tmp_path / "changed", edit)
    row = mnist_row(changed)
    assert row["ours"] is None and row["run"] is None
    assert [Path(o["dir"]).name for o in row["other_runs"]] == ["changed"]
    assert shown in row["other_runs"][0]["differences"]
    out = StringIO()
    with redirect_stdout(out):
        assert reproduce.main(["--paper=mbcliquenet", "--runs", str(changed)]) == 0
    text = out.getvalue()
    assert "other runs (not the paper's setting, not shown as ours):" in text
    assert "changed (MBCliqueNet, MNIST): " in text and shown in text
    line = next(li for li in text.splitlines()
                if li.startswith("MBCliqueNet ") and "MNIST" in li)
    assert line.endswith("not run")


def test_the_run_before_the_training_rule_is_another_run_with_its_difference_named():
    """The committed reduced MNIST run trained with plain momentum and unclipped latent
    filters: the row's recipe now has both, so that run is another run of the row."""
    row = mnist_row(COMMITTED_RUN)
    assert row["run"] is None and row["ours"] is None
    (other,) = row["other_runs"]
    assert other["differences"] == [
        "model.widths=[32, 32, 64] (recipe: [64, 64, 128])", "train.epochs=8 (recipe: 32)",
        "optimizer.clip_latent=false (absent: the default before the field existed; "
        "recipe: true)", "optimizer.nesterov=false (recipe: true)"]


@pytest.mark.parametrize("edit, results, is_the_rows, shown", [
    (lambda c: c["train"].update(batch_size=64), None, False,
     "train.batch_size=64 (recipe: 128) without the learning rates the linear rule gives it "
     "(optimizer.lr=0.05, schedule.min_lr=5e-05)"),
    (lambda c: (c["train"].update(batch_size=64), c["optimizer"].update(lr=0.05),
                c["schedule"].update(min_lr=5e-5)), None, True,
     "train.batch_size=64 (recipe: 128) with optimizer.lr=0.05, schedule.min_lr=5e-05 (the "
     "recipe's x 0.5: the linear rule)"),
    (lambda c: (c["train"].update(batch_size=256), c["optimizer"].update(lr=0.2)), None, False,
     "schedule.min_lr=0.0002"),
    (lambda c: c["train"].update(epochs=1), {"epochs": 1.0}, False,
     "trained 1 epochs, less than one SGDR cycle (2 epochs)"),
    (lambda c: c["train"].update(max_steps=10), {"epochs": 10 / 469}, False,
     "less than one SGDR cycle (2 epochs)"),
], ids=["batch-at-the-recipes-rate", "batch-and-rates-scaled", "min-rate-not-scaled",
        "one-epoch", "ten-steps"])
def test_a_batch_is_scale_only_with_the_rates_scaled_and_a_run_needs_a_cycle(
        tmp_path, edit, results, is_the_rows, shown):
    """A batch change is scale only with lr and min_lr scaled by the linear rule (the batch
    64 copy of the MNIST run at lr 0.1 is another run); a run shorter than one SGDR cycle
    never reaches the minimum rate and is not the row's."""
    copy_of_committed_run(tmp_path / "copy", edit, results)
    row = mnist_row(tmp_path)
    if is_the_rows:
        assert row["ours"] == 99.38 and row["run"]["reduced"]
        assert shown in row["run"]["differences"] and not row["other_runs"]
    else:
        assert row["ours"] is None and row["run"] is None
        assert any(shown in change for change in row["other_runs"][0]["differences"])


def test_mbcliquenet_rows_show_best_beside_final_and_mark_read_values(tmp_path):
    copy_of_committed_run(tmp_path / "copy", lambda c: None,
                          {"final_test_accuracy": 0.9921, "best_test_accuracy": 0.9934})
    report = run_json(["--json", "--paper=mbcliquenet", "--runs", str(tmp_path)])
    mnist = next(r for r in report["rows"] if r["dataset"] == "MNIST")
    assert (mnist["ours"], mnist["ours_best"], mnist["read_values"]) == (99.21, 99.34, [])
    cifar = next(r for r in report["rows"] if r["dataset"] == "CIFAR-10"
                 and r["metric"].startswith("test accuracy"))
    assert cifar["ours_best"] is None
    assert cifar["read_values"][0].startswith("schedule.min_lr=1e-05: read: the exponent is "
                                              "lost in the source")
    tiny = next(r for r in report["rows"] if r["dataset"] == "Tiny ImageNet-100")
    assert [value.split(":")[0] for value in tiny["read_values"]] == [
        "data.image_size=64", "schedule.min_lr=0.0001", "train.epochs=256"]
    out = StringIO()
    with redirect_stdout(out):
        assert reproduce.main(["--paper=mbcliquenet", "--runs", str(tmp_path)]) == 0
    line = next(li for li in out.getvalue().splitlines() if li.startswith("MBCliqueNet ")
                and "MNIST" in li)
    assert "99.21" in line and "(best epoch: 99.34)" in line


def test_a_field_absent_from_an_old_run_takes_the_default_of_its_time(tmp_path):
    """The committed run predates `data.augment` (then always flip + pad-and-crop, "cifar"):
    it is the row's run; a run without `model.bn_epsilon` had the TensorFlow 1e-3."""
    config = json.loads((COMMITTED_RUN / "config.json").read_text())
    assert "augment" not in config["data"]
    copy_of_committed_run(tmp_path / "old_bn", lambda c: [c["model"].pop(f) for f in (
        "bn_epsilon", "bn_momentum", "bn_running_var")])
    row = mnist_row(tmp_path)
    assert row["run"] is None
    assert "model.bn_epsilon=0.001 (absent: the default before the field existed; " \
           "recipe: 1e-05)" in row["other_runs"][0]["differences"]
    defaults = run_dir.BEFORE_THE_FIELD  # the table resume reads too
    assert defaults["data.augment"] == "cifar" and defaults["schedule.sgdr_restarts"] == "summed"


def test_mbcliquenet_parameter_rows_are_published_beside_ours(mbcliquenet_report):
    _, report = mbcliquenet_report
    rows = {(r["table"], r["model"]): r for r in report["rows"] if r["metric"] == "params (M)"}
    assert {key: r["published"] for key, r in rows.items()} == {
        ("Table 1", "MBCliqueNet"): 5.2, ("Table 2", "MBCliqueNet (K=2)"): 1.6,
        ("Table 2", "MBCliqueNet (K=4)"): 1.3, ("Table 2", "MBCliqueNet (K=8)"): 1.1}
    for row in rows.values():
        assert row["ours"] == round(row["params"] / 1e6, 2)
        assert row["off_by"] == round(row["ours"] - row["published"], 2)
        assert "docs/papers.md" in row["note"] and row["run"] is None
    # the closest reading is counted on the real model, and docs/papers.md names it
    k8 = next(r for r in reproduce.paper_rows(["mbcliquenet"]) if r.metric == "params"
              and r.model == "MBCliqueNet (K=8)").recipe.load()
    closest = rows[("Table 2", "MBCliqueNet (K=8)")]["closest_reading"]
    k8.model.update({field.removeprefix("model."): v for field, v in closest["fields"].items()})
    assert closest["params"] == summary.param_count(k8) != rows[("Table 2", "MBCliqueNet (K=8)")][
        "params"]
    named = ", ".join(f"{f.removeprefix('model.')}={v}" for f, v in closest["fields"].items())
    assert f"the closest is\n`{named}`" in (REPO_ROOT / "docs" / "papers.md").read_text()


def test_papers_md_table_shows_the_counts_of_the_default_reading():
    """docs/papers.md names each published MBCliqueNet count and ours under the default
    reading; ours there are what the default configs count now."""
    docs = (REPO_ROOT / "docs" / "papers.md").read_text()
    line = next(li for li in docs.splitlines() if li.startswith("| default |"))
    shown = [float(cell) for cell in line.strip("|").split("|")[1:5]]
    rows = [r for r in reproduce.paper_rows(["mbcliquenet"]) if r.metric == "params"]
    assert [round(summary.param_count(r.recipe.load()) / 1e6, 2) for r in rows] == shown
    for row in rows:
        assert f"({row.published}M)" in docs


@pytest.mark.parametrize("files, message", [
    ({"config.json": "{not json", "results.json": "{}"}, "config.json: not readable as JSON"),
    ({"config.json": "[1, 2]", "results.json": "{}"}, 'not a config (no "model" object)'),
    ({"results.json": "{}"}, "results.json: epochs missing is not a number in [0, inf]"),
    ({"results.json": '{"epochs": 8, "final_test_accuracy": 99.4, "best_test_accuracy": 1}'},
     "final_test_accuracy 99.4 is not a number in [0, 1] or null"),
    ({"results.json": '{"epochs": 8, "final_test_accuracy": 0.9}'},
     "best_test_accuracy missing is not a number in [0, 1] or null"),
    ({"results.json": "[]"}, "results.json: not a JSON object"),
])
def test_a_malformed_run_directory_is_one_line_and_a_failure(tmp_path, capsys, files, message):
    run = copy_of_committed_run(tmp_path / "bad", lambda config: None)
    for name, text in files.items():
        (run / name).write_text(text)
    assert reproduce.main(["--paper=mbcliquenet", "--runs", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err and str(run) in err


def test_a_run_whose_model_cannot_be_built_is_one_line(tmp_path, capsys):
    copy_of_committed_run(tmp_path / "bad", lambda c: c["model"].update(K=5))
    assert reproduce.main(["--paper=mbcliquenet", "--runs", str(tmp_path)]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and "its model cannot be built (model.K=5 does not divide" in err


def test_cliquenet_tab1_heading_says_its_setting_is_not_given():
    rows = [r for r in reproduce.paper_rows(["cliquenet"]) if r.table == "Tab 1"]
    text = reproduce.format_tables(reproduce.build_rows(rows, [], counts=False), [])
    assert "k and T are not given by the source" in text.splitlines()[0]


def test_full_recipe_run_is_not_reduced_and_only_matches_its_model(mbcliquenet_report):
    _, report = mbcliquenet_report
    by_model = {(r["model"], r["dataset"]): r for r in report["rows"]
                if r["table"] == "Table 1"}
    u_row = by_model[("u-MBCliqueNet", "CIFAR-10")]
    assert u_row["ours"] == 95.77 and u_row["run"]["reduced"] is False
    assert u_row["run"]["differences"] == []
    assert by_model[("MBCliqueNet", "CIFAR-10")]["run"] is None  # binarize differs
    unmatched = {Path(item["dir"]).name: item["reason"] for item in report["unmatched_runs"]}
    assert unmatched == {"densenet_small": "matches no row",
                         "unfinished": "no results.json (unfinished run)"}


def test_text_table_shows_published_ours_and_the_run(mbcliquenet_report):
    runs, _ = mbcliquenet_report
    out = StringIO()
    with redirect_stdout(out):
        assert reproduce.main(["--paper=mbcliquenet", "--runs", str(runs)]) == 0
    line = next(li for li in out.getvalue().splitlines() if li.startswith("MBCliqueNet ")
                and "MNIST" in li)
    assert "99.63" in line and "99.35" in line
    assert "reduced run (params, FLOPs: its own): model.widths" in line
    assert "not run" in out.getvalue()


def test_readme_shows_this_commands_output_on_the_committed_runs():
    """README.md's results table is `reproduce --paper=mbcliquenet` as printed today, over
    the runs committed under results/ (the MNIST row's measured accuracy included)."""
    readme = (REPO_ROOT / "README.md").read_text()
    shown = readme.split(README_COMMAND, 1)[1].split("```\n```\n", 1)[1].split("```", 1)[0]
    out = StringIO()
    with redirect_stdout(out):
        assert reproduce.main(shlex.split(README_COMMAND)[3:]) == 0
    assert shown == out.getvalue()
    # the reduced run of the previous training rule, listed with its difference named
    assert ("results/mbclique_mnist_w32_momentum_noclip (MBCliqueNet, MNIST): model.widths"
            in shown and "optimizer.nesterov=false (recipe: true)" in shown)


def test_counts_are_summarys_and_match_the_published_ones():
    rows = [r for r in reproduce.paper_rows(["cliquenet"])
            if r.model == "CliqueNet (k=36, T=12)" and r.metric in ("params", "flops")]
    rows += [r for r in reproduce.paper_rows(["mbcliquenet"]) if r.model == "MBCliqueNet (K=2)"]
    entries = reproduce.build_rows(rows, [])
    for row, entry in zip(rows, entries, strict=True):
        counted = summary.summarize(row.recipe.load())
        assert (entry["params"], entry["flops"]) == (counted["params"], counted["flops"])
    params, flops = entries[:2]
    assert params["ours"] == params["published"] == 0.94  # the CliqueNet Tab 3 rounding
    assert flops["ours"] == flops["published"] == 0.91
    assert params["run"] is None


def test_every_command_is_a_valid_launch_command_for_its_recipe():
    rows = reproduce.paper_rows()
    text = reproduce.format_commands(reproduce.build_rows(rows, [], counts=False))
    commands = [line for line in text.splitlines() if not line.startswith("#")]
    assert len(commands) == len({r.recipe for r in rows}) > 40
    recipes = {r.recipe.command(): r.recipe for r in rows}
    for command in commands:
        argv = shlex.split(command)
        assert argv[:2] == ["python", "launch.py"] and argv[-1].startswith("--workdir=results/")
        config_file = argv[2].removeprefix("--config=")
        assert (REPO_ROOT / config_file).is_file()
        flag_values = flags.FlagValues()
        parse_argv = ["launch.py", f"--config={REPO_ROOT / config_file}", *argv[3:-1]]
        config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                        lock_config=True, sys_argv=parse_argv)
        flag_values(parse_argv)  # an unknown field or a badly typed value raises here
        assert flag_values.config.to_dict() == recipes[command].load().to_dict(), command


@pytest.mark.slow
def test_cli_commands_and_a_bad_runs_directory(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    listed = subprocess.run([sys.executable, "-m", "cliquejax.reproduce", "--commands",
                             "--paper=mbcliquenet"], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "--config=configs/mbclique_mnist.py --workdir=results/mbclique_mnist" in listed.stdout
    missing = tmp_path / "nowhere"
    bad = subprocess.run([sys.executable, "-m", "cliquejax.reproduce", "--runs", str(missing)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and str(missing) in bad.stderr
    assert not missing.exists()


def test_dataset_of_npz_and_folders():
    assert reproduce.dataset_of({"data.name": "npz", "data.path": "/d/MNIST_60k.npz"}) == "mnist"
    assert reproduce.dataset_of({"data.name": "npz", "data.path": "fashion_mnist.npz"}) != "mnist"
    assert reproduce.dataset_of({"data.name": "npz", "data.path": "my_cifar100.npz"}) == (
        "cifar100")
    assert reproduce.dataset_of({"data.name": "image_folder", "data.image_size": 64,
                                 "data.num_classes": 100}) == "tiny_imagenet_100"
    assert reproduce.dataset_of({"data.name": "svhn_cropped"}) == "svhn_cropped"
