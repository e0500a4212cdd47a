"""`pip install .` (not editable) in an empty virtualenv gives a working package: its
dependencies come with it, and its commands run from another directory with configs given by
path."""

import os
import re
import shutil
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from cliquejax import predict
from cliquejax.data import sources
from tests.conftest import ROOT

# What a wheel is built from: the package and its metadata (a copy, so that the build's
# leftovers do not land in the checkout).
PACKAGE_FILES = ("cliquejax", "pyproject.toml", "README.md")


@pytest.mark.slow
def test_pip_install_in_an_empty_venv_runs_summary_and_predict(trained_digits_run, tmp_path,
                                                               capsys):
    config, workdir, _ = trained_digits_run
    source = tmp_path / "source"
    source.mkdir()
    for name in PACKAGE_FILES:
        if os.path.isdir(os.path.join(ROOT, name)):
            shutil.copytree(os.path.join(ROOT, name), source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(os.path.join(ROOT, name), source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([python, "-m", "pip", "install", "--quiet", str(source)], check=True,
                   env=env, timeout=1200)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = lambda *argv: subprocess.run(argv, cwd=elsewhere, env=env, capture_output=True,
                                       text=True, timeout=600)

    train = run(str(venv / "bin" / "cliquejax-train"), "--helpshort")  # launch.py's command
    assert "--workdir" in train.stdout + train.stderr and "Traceback" not in train.stderr
    config_file = os.path.join(ROOT, "configs", "mbclique_cifar10.py")
    for command in ([python, "-m", "cliquejax.summary"], [str(venv / "bin" / "cliquejax-summary")]):
        done = run(*command, f"--config={config_file}")
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert "params" in done.stdout and "FLOPs" in done.stdout

    test = sources.load_source(config.data, "test")
    images = tmp_path / "images.npz"
    np.savez(images, images=np.stack([test[i]["image"] for i in range(8)]))
    predict.main([f"--workdir={workdir}", str(images), "--top=2"])  # this checkout, in process
    done = run(python, "-m", "cliquejax.predict", f"--workdir={workdir}", str(images), "--top=2")
    assert done.returncode == 0, done.stderr
    assert done.stdout == capsys.readouterr().out
    # the installed package, not this checkout
    located = run(python, "-c", "import cliquejax; print(cliquejax.__file__)")
    assert located.stdout.startswith(str(venv))


def test_dependency_floors_are_the_oldest_tested_stack():
    """pyproject.toml's `>=` floors are requirements-oldest.txt's pins (`make test-oldest`
    runs the fast tests there): a floor below them would promise a stack no test runs."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        dependencies = tomllib.load(file)["project"]["dependencies"]
    floors = dict(re.fullmatch(r"([\w.-]+)>=([\w.]+)", d).groups() for d in dependencies)
    with open(os.path.join(ROOT, "requirements-oldest.txt")) as file:
        pins = dict(line.strip().split("==") for line in file if "==" in line)
    normal = lambda name: name.lower().replace("_", "-")
    assert {normal(k): v for k, v in floors.items()} == {normal(k): v for k, v in pins.items()}
