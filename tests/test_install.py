"""`pip install .` (not editable) in an empty virtualenv gives the whole tool: its
dependencies and configs come with it, and every command runs in an empty directory, a
config given by name or by path (a copy out of the tree included)."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from cliquejax.data import sources
from tests.conftest import ROOT, tiny_digits_config

# What a wheel is built from: the package and its metadata (a copy, so that the build's
# leftovers do not land in the checkout).
PACKAGE_FILES = ("cliquejax", "pyproject.toml", "setup.py", "README.md")
TINY = ("--config.model.widths=16,16,32", "--config.model.layers=2,2,2",
        "--config.train.epochs=1", "--config.train.batch_size=64")


@pytest.mark.slow
def test_pip_install_in_an_empty_venv_runs_every_command(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in PACKAGE_FILES:
        if os.path.isdir(os.path.join(ROOT, name)):
            shutil.copytree(os.path.join(ROOT, name), source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(os.path.join(ROOT, name), source / name)
    # an earlier build's leftover (a module a fork deleted) is not installed
    os.makedirs(source / "build" / "lib" / "cliquejax")
    (source / "build" / "lib" / "cliquejax" / "deleted_module.py").write_text("x = 1\n")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, bin_dir = str(venv / "bin" / "python"), venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), TFDS_DATA_DIR=str(tmp_path / "tfds"))
    # The dependencies: this interpreter's installed packages, reached through a .pth file
    # (a plain path entry: the .pth files there, such as make's editable cliquejax, are not
    # read), so that no wheel is downloaded or unpacked again; `pip check` then checks
    # them against the installed package's requirements.
    site_packages = subprocess.run([python, "-c", "import site; print(site.getsitepackages()"
                                    "[0])"], capture_output=True, text=True, check=True)
    with open(os.path.join(site_packages.stdout.strip(), "dependencies.pth"), "w") as pth:
        pth.writelines(f"{path}\n" for path in sys.path
                       if os.path.basename(path) in ("site-packages", "dist-packages"))
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", str(source)],
                   check=True, env=env, timeout=1200)
    subprocess.run([python, "-m", "pip", "check"], check=True, env=env, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*argv, code=0):
        done = subprocess.run([str(a) for a in argv], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == code and "Traceback" not in done.stderr, (argv, done.stderr)
        return done

    located = run(python, "-c", "import cliquejax, os; print(cliquejax.__file__); "
                  "print(os.path.exists(os.path.join(os.path.dirname(cliquejax.__file__), "
                  "'deleted_module.py')))")
    assert located.stdout.split() == [str(venv / "lib" / f"python{sys.version_info[0]}."
                                          f"{sys.version_info[1]}" / "site-packages" /
                                          "cliquejax" / "__init__.py"), "False"]
    # the console script's usage is launch.py's (the line naming the program aside)
    installed = run(bin_dir / "cliquejax-train", "--helpshort", code=1).stdout.splitlines()
    checkout = subprocess.run([sys.executable, "launch.py", "--helpshort"], cwd=ROOT,
                              capture_output=True, text=True).stdout.splitlines()
    differ = [(a, b) for a, b in zip(installed, checkout, strict=True) if a != b]
    assert differ == [(f"{bin_dir / 'cliquejax-train'}:", "launch.py:")]

    done = run(bin_dir / "cliquejax-train", "--config=mbclique_digits", *TINY,
               "--workdir=run")
    assert '"final_test_accuracy"' in done.stdout
    assert not os.path.exists(elsewhere / "data")  # the digits are built in the cache
    assert os.listdir(tmp_path / "cache" / "cliquejax")
    shutil.copy(os.path.join(ROOT, "configs", "mbclique_cifar10.py"), elsewhere / "mine.py")
    for command in ([python, "-m", "cliquejax.summary", "--config=mbclique_cifar10"],
                    [bin_dir / "cliquejax-summary", "--config=mine.py"]):
        done = run(*command)
        assert done.stderr == "" and "params 2.37M" in done.stdout
    run(python, "-m", "cliquejax.lower", "--config=mbclique_digits")
    table = run(python, "-m", "cliquejax.reproduce", "--paper=mbcliquenet").stdout
    assert "MBCliqueNet, Table 1" in table
    test = sources.load_source(tiny_digits_config().data, "test")
    np.savez(elsewhere / "images.npz", images=np.stack([test[i]["image"] for i in range(8)]))
    predicted = run(python, "-m", "cliquejax.predict", "--workdir=run", "images.npz", "--top=2")
    assert len(predicted.stdout.splitlines()) >= 8
    run(python, "-m", "cliquejax.export", "--workdir=run", "--out=digits.clqs",
        "--format=standalone")
    assert os.path.getsize(elsewhere / "digits.clqs") > 0


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


def test_the_readme_install_lines_are_the_checked_ones():
    """tools/install_lines.txt (tools/check_install_lines.sh, a dry run of each against the
    package registry) holds every `pip install` line of the README, resolved; run the
    script again after changing one."""
    spec = importlib.util.spec_from_file_location(
        "readme_install_lines", os.path.join(ROOT, "tools", "readme_install_lines.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(os.path.join(ROOT, "tools", "install_lines.txt")) as file:
        recorded = [line.split("  ->  ")[0].split(None, 1) for line in file
                    if not line.startswith("#")]
    assert [line for _, line in recorded] == module.readme_install_lines()
    assert {status for status, _ in recorded} == {"ok"}


def test_the_accelerator_locks_are_the_tested_lock_but_jax():
    """requirements-cuda12.txt and -tpu.txt are requirements.txt at another jax (the newest
    with that accelerator's packages on the registry) plus jax's extra: no other pin apart."""
    def pins(name):
        with open(os.path.join(ROOT, name)) as file:
            return dict(line.strip().split("==") for line in file
                        if "==" in line and not line.startswith("#"))

    tested = pins("requirements.txt")
    for name, extra in (("requirements-cuda12.txt", "jax[cuda12]"),
                        ("requirements-tpu.txt", "jax[tpu]")):
        lock = pins(name)
        version = lock.pop(extra)
        assert lock == dict(tested, jax=version, jaxlib=version), name
