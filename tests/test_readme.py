"""Every command in README.md still works as written.

The commands are read from the README's ```sh blocks (continuation lines joined, trailing
comments dropped). Each `python ...` command is checked by what it is:
- `launch.py` with `--config`: the config file and every override parse as launch.py parses
  them (ml_collections config_flags), and the network of that config builds;
- the quick commands (summary, lower, export, standalone.py, predict, and launch.py on an
  existing run) run as written, on a trained run of the digits put where the README says
  it is; the reproduce command runs in test_reproduce.py, against the output shown;
- anything else (`make`, `pip`, `tfds`, `srun`, `source`, `cp`) is listed in SHELL_ONLY.
A command the test does not know fails it, so the README cannot gain an unchecked one.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from cliquejax import models, summary
from tests.conftest import launch_config
from tests.test_reproduce import README_COMMAND

pytestmark = pytest.mark.slow  # every test here runs the README's commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELL_ONLY = ("make", "pip", "tfds", "srun", "source", "cp")
RUN_DIR = "runs/mbclique_digits"  # the run the README's deploy commands read


def readme_commands() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as handle:
        text = handle.read()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split(" && "):
                if part.strip():
                    commands.append(" ".join(part.split()))
    return commands


COMMANDS = readme_commands()


def kind(command: str) -> str:
    words = shlex.split(command)
    if words[0] in SHELL_ONLY:
        return "shell"
    if words[0] != "python":
        return "unknown"
    if words[1] == "launch.py":
        return "launch" if any(w.startswith("--config=") for w in words) else "launch_run"
    if words[1] == "-m":
        return words[2]
    return "script" if words[1].endswith("standalone.py") else "unknown"


def test_every_readme_command_is_checked():
    kinds = {command: kind(command) for command in COMMANDS}
    known = {"shell", "launch", "launch_run", "cliquejax.summary", "cliquejax.reproduce",
             "cliquejax.lower", "cliquejax.export", "cliquejax.predict", "script"}
    assert len(COMMANDS) > 10
    assert {c: k for c, k in kinds.items() if k not in known} == {}


def parse_launch_config(command: str):
    """The config launch.py would run, parsed by config_flags from the command's words."""
    return launch_config(["launch.py", *(w for w in shlex.split(command)[2:]
                                         if w.startswith("--config"))])


@pytest.mark.parametrize("command", [c for c in COMMANDS if kind(c) == "launch"])
def test_launch_commands_parse_and_build(command):
    config = parse_launch_config(command)
    image_shape, num_classes = summary.model_input(config)
    model = models.build_model(config, num_classes)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            np.zeros((1, *image_shape), np.float32))
    assert shapes["params"]


@pytest.fixture(scope="module")
def readme_dir(trained_digits_run, tmp_path_factory):
    """A directory laid out as the README assumes: the repository's code and configs, and a
    trained digits run at runs/mbclique_digits; plus images.npz of test digits."""
    from cliquejax.data import sources

    config, workdir, _ = trained_digits_run
    here = tmp_path_factory.mktemp("readme")
    for name in ("cliquejax", "configs", "launch.py"):
        os.symlink(os.path.join(ROOT, name), here / name)
    shutil.copytree(workdir, here / RUN_DIR)
    test = sources.load_source(config.data, "test")
    np.savez(here / "images.npz", images=np.stack([test[i]["image"] for i in range(9)]))
    return here


def run(command: str, cwd) -> subprocess.CompletedProcess:
    words = shlex.split(command)
    done = subprocess.run([sys.executable, *words[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
    return done


QUICK = ("cliquejax.summary", "cliquejax.lower", "cliquejax.export", "script",
         "cliquejax.predict", "launch_run")


def test_quick_commands_run_as_written(readme_dir, tmp_path):
    """In README order (export writes what standalone.py reads); `cp` is done as written."""
    ran = []
    for command in COMMANDS:
        if command.startswith("cp "):
            source, target = shlex.split(command)[1:3]
            target_dir = tmp_path / target.strip("/").replace("/", "_")
            target_dir.mkdir(exist_ok=True)
            shutil.copy(readme_dir / source, target_dir)
            continue
        if kind(command) not in QUICK:
            # test_reproduce.py runs the reproduce command and checks the output shown
            assert kind(command) != "cliquejax.reproduce" or command == README_COMMAND
            continue
        if kind(command) == "script":
            script = os.path.basename(shlex.split(command)[1])
            copied = next(tmp_path.glob(f"*/{script}"))
            command = command.replace(shlex.split(command)[1], str(copied))
        done = run(command, readme_dir)
        assert done.stdout.strip(), command
        ran.append(kind(command))
    assert set(ran) == set(QUICK), ran


def test_the_package_imports_from_any_directory(tmp_path):
    """make installs cliquejax into .venv (editable): the README's commands work from
    anywhere with the venv's interpreter, and they run this checkout's code."""
    done = subprocess.run([sys.executable, "-c", "import cliquejax; print(cliquejax.__file__)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert os.path.realpath(done.stdout.strip()).startswith(os.path.realpath(ROOT))
