"""Shared fixtures: tiny configs and one short trained run on the bundled digits. The tests
run under the XLA flags launch.py sets (`platform.configure_xla`, before JAX starts).

One JAX compilation cache serves the whole session, fresh for it: the xdist workers and the
launch.py processes they start inherit its directory from the first process to import this
file, so a program compiled by one of them is loaded by the others (the same executable, so
the same bits). Tests about the cache itself give their own directory."""

import fcntl
import json
import os
import shutil
import sys
import tempfile

import pytest

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cliquejax-tests-jax-")
    SESSION_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]  # this process removes it
else:
    SESSION_CACHE = None
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Where `data.data_dir=""` puts data (the digits in $XDG_CACHE_HOME/cliquejax, TFDS data sets
# in $TFDS_DATA_DIR): a directory of this session's, shared like the cache above, never the
# real home's.
if "CLIQUEJAX_TESTS_HOME" not in os.environ:
    os.environ["CLIQUEJAX_TESTS_HOME"] = tempfile.mkdtemp(prefix="cliquejax-tests-home-")
    SESSION_HOME = os.environ["CLIQUEJAX_TESTS_HOME"]  # this process removes it
else:
    SESSION_HOME = None
os.environ["XDG_CACHE_HOME"] = os.path.join(os.environ["CLIQUEJAX_TESTS_HOME"], "cache")
os.environ["TFDS_DATA_DIR"] = os.path.join(os.environ["CLIQUEJAX_TESTS_HOME"], "tfds")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# XLA flags added to this process and to every process the tests start (which otherwise set
# XLA_FLAGS to their device count alone): CLIQUEJAX_TEST_XLA_FLAGS=--xla_cpu_max_isa=AVX2
# runs the suite as an AVX2-only CPU would, on an AVX-512 one.
TEST_XLA_FLAGS = os.environ.get("CLIQUEJAX_TEST_XLA_FLAGS", "").strip()
if TEST_XLA_FLAGS:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def host_devices(count: int) -> str:
    """XLA_FLAGS for a process with `count` CPU devices (plus CLIQUEJAX_TEST_XLA_FLAGS)."""
    return f"--xla_force_host_platform_device_count={count} {TEST_XLA_FLAGS}".strip()


from cliquejax import platform  # noqa: E402

platform.configure_xla()

from configs import mbclique_digits  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(ROOT, "data", "tfds")


# The longest files first (make test runs them on two workers, a file to one worker): a long
# file started last would leave the other worker idle at the end. Paths from tests/, since
# some names are in tests/ and tests/cpu/ both; most expensive first, from a full run's times.
LONGEST_FIRST = ("test_survive.py", "test_distributed.py", "test_train.py", "test_install.py",
                 "test_faults.py", "test_readme.py", "cpu/test_remat.py",
                 "test_precision_remat.py", "test_models.py", "cpu/test_kernels.py",
                 "test_export.py", "test_lower.py", "test_mbcliquenet.py",
                 "test_compatibility.py")


SLOW_FIXTURES = {"trained_digits_run", "mbcliquenet_report"}


def pytest_unconfigure(config):
    for directory in (SESSION_CACHE, SESSION_HOME):
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


def pytest_collection_modifyitems(items):
    for item in items:  # fixtures that train a run or build the reproduce table of every
        # recipe: not `make test-fast`
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    tests = os.path.dirname(os.path.abspath(__file__))
    items.sort(key=lambda item: rank.get(  # stable: the order within a file is kept
        os.path.relpath(item.path, tests).replace(os.sep, "/"), len(rank)))


def python_without_cliquejax(env=None) -> tuple[list[str], dict]:
    """(argv prefix, environment) of this interpreter with its installed packages but not the
    editable cliquejax that make installs: `-S` skips the site-packages .pth files (where the
    editable install hooks in) and PYTHONPATH gives back the packages themselves (read from
    sys.path, so that it also works in an interpreter started this way)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages"))
    return [sys.executable, "-S", "-s"], env


def launch_config(argv: list[str]):
    """The config launch.py would run for `argv` (its `--config` file and `--config.x`
    overrides), parsed as launch.py defines the flag: a locked config, overrides only of
    fields it has. Relative paths are from the repository."""
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:  # config_flags defines the --config.x overrides from `sys_argv`, as from sys.argv
        config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                        lock_config=True, sys_argv=argv)
        values(argv)
        return values.config
    finally:
        os.chdir(cwd)


def tiny_digits_config(**train):
    """A small MBCliqueNet on the digits: a few seconds per epoch on 2 cores."""
    config = mbclique_digits.get_config()
    config.model.widths, config.model.layers = (16, 16, 32), (2, 2, 2)
    config.data.data_dir = DATA_DIR
    config.train.update(dict(epochs=2, batch_size=64, eval_batch_size=128, log_every_steps=5))
    config.train.update(train)
    return config


@pytest.fixture(scope="session")
def trained_digits_run(tmp_path_factory):
    """(config, workdir, results) of a finished six-epoch run (SGDR cycles end at epochs 2
    and 4; the run ends halfway through the next).

    Trained once per session: under xdist the first worker to ask trains it while the other
    waits on a lock. Each worker gets its own copy, since the tests evaluate it again (which
    locks the workdir and writes eval.json) and export it."""
    from cliquejax.train import loop

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, shared by its workers
    trained = root / "digits_run_trained"
    config = tiny_digits_config(epochs=6)
    with open(root / "digits_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (trained / "results.json").exists():
            loop.train_and_evaluate(config, str(trained))
    workdir = tmp_path_factory.mktemp("digits_run") / "run"
    shutil.copytree(trained, workdir)
    with open(workdir / "results.json") as handle:
        return config, str(workdir), json.load(handle)
