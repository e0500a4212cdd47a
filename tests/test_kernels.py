"""`config.train.kernels` and `config.train.remat=auto`: the choices per backend
(`cliquejax.kernels`), and a copy of the repository without `cliquejax/cpu/` whose fast tests
pass (the CPU kernels themselves: tests/cpu/)."""

import ast
import os
import pathlib
import shutil
import subprocess

import jax
import pytest

from cliquejax import kernels
from cliquejax.models import build_model
from configs.default import get_config
from tests.conftest import python_without_cliquejax
from tests.test_precision_remat import cliquenet_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- the choice


@pytest.mark.parametrize("choice,backend,resolved", [
    ("auto", "cuda", "reference"), ("auto", "tpu", "reference"),
    ("reference", "cpu", "reference")])
def test_resolve(choice, backend, resolved):
    config = get_config()
    config.train.kernels = choice
    assert kernels.resolve(config, backend) == resolved
    assert kernels.namespace(resolved).name == resolved


def test_auto_is_the_default_and_follows_jax_backend():
    assert get_config().train.kernels == "auto"
    on_cpu = jax.default_backend() == "cpu" and kernels.cpu_kernels_present()
    assert kernels.resolve(get_config()) == ("cpu" if on_cpu else "reference")


@pytest.mark.parametrize("choice,backend,resolved", [
    ("auto", "cuda", "none"), ("auto", "tpu", "none"), ("block", "cpu", "block"),
    ("layer", "cuda", "layer")])
def test_remat(choice, backend, resolved):
    assert get_config().train.remat == "auto"
    assert kernels.remat(choice, backend) == resolved


def test_bad_choice_is_a_one_line_error():
    config = cliquenet_config()
    config.train.kernels = "gpu"
    with pytest.raises(ValueError) as error:
        build_model(config, 10)
    assert str(error.value) == "train.kernels='gpu' is not one of: auto, reference, cpu"


def test_without_the_cpu_package_auto_is_the_reference(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_kernels_present", lambda: False)
    assert kernels.resolve(get_config(), "cpu") == "reference"
    assert kernels.remat("auto", "cpu") == "none"
    with pytest.raises(ValueError, match="train.kernels='cpu' needs the cliquejax/cpu/"):
        kernels.namespace("cpu")


def test_only_the_chooser_imports_the_cpu_package():
    """The reference modules never import `cliquejax.cpu` (a fork may delete it)."""
    allowed = {"kernels.py", "platform.py"}
    for path in sorted((ROOT / "cliquejax").rglob("*.py")):
        if "cpu" in path.relative_to(ROOT / "cliquejax").parts[:-1] or path.name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) and node.module else [])
            assert not [n for n in names if n.startswith("cliquejax.cpu")], path


@pytest.mark.slow
@pytest.mark.fork  # the whole fast tier again: `make test-without-cpu`, not `make test`
def test_a_copy_without_the_cpu_package_passes_the_fast_tests(tmp_path):
    """Deleting `cliquejax/cpu/` leaves a codebase whose fast tests pass: `auto` is the
    reference operations, tests/cpu/ skips, no XLA:CPU set-up is made
    (tests/test_platform.py)."""
    copy = tmp_path / "repo"  # the working tree, without dot-folders (.git, .venv), runs
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".*", "__pycache__", "*.egg-info",
                                                              "runs"))
    shutil.rmtree(copy / "cliquejax" / "cpu")
    python, env = python_without_cliquejax({k: v for k, v in os.environ.items()
                                            if k not in ("XLA_FLAGS", "PYTHONPATH")})
    env["PYTHONPATH"] = os.pathsep.join([str(copy), env["PYTHONPATH"]])
    done = subprocess.run([*python, "-m", "pytest", "-m", "not slow", "-x", "-q", "-n", "2",
                           "-p", "no:cacheprovider", "tests"],
                          capture_output=True, text=True,
                          timeout=2400, env=env, cwd=copy)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
