"""Train or evaluate a config (`python launch.py`, or `cliquejax-train` once installed):

    python launch.py --config=configs/mbclique_cifar10.py --workdir=runs/mbclique_cifar10
    cliquejax-train --config=mbclique_cifar10 --workdir=DIR   # a shipped config, by name
    python launch.py --config=configs/cliquenet_cifar10.py --config.model.k=64 --workdir=DIR
    python launch.py --workdir=DIR               # resume DIR with its own config.json
    python launch.py --workdir=DIR --mode=eval   # evaluate DIR's latest good checkpoint

A workdir's config.json is the run's identity: resuming with a config that changes the run
is refused (--overwrite moves the old run into DIR/previous-<time>/ and starts anew). Its
data.json records the data read (a fingerprint) and its normalisation: resuming or
evaluating on data that changed is refused (--accept_data_change goes on, recording it).
Every check runs before anything is written (`cliquejax.train.preflight`).

Multi-host: every process runs the same command plus --coordinator_address=HOST:PORT
--num_processes=N --process_id=I, or --distributed to let JAX detect the cluster (SLURM, TPU);
where the environment shows several processes (srun, Open MPI, a TPU pod, the
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID variables) it does so by itself.
"""

import os
import signal
import sys

from cliquejax import cli, platform  # the standard library only: Ctrl-C stays one line

FLAGS = None  # absl's flags, once `define_flags` ran


def _interrupted_while_starting(signum, frame):
    os.write(2, b"error: interrupted (Ctrl-C) while starting; nothing was changed\n")
    os._exit(130)


def define_flags() -> None:
    """The command's flags, defined once in this process."""
    global FLAGS
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "A config file, or a shipped config's name "
                                    "(mbclique_cifar10: cliquejax/configs/).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots, results.")
    flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (resuming) or evaluate.")
    flags.DEFINE_bool("overwrite", False, "Start anew: move the run in --workdir (if any) into "
                      "<workdir>/previous-<time>/ (never deleted).")
    flags.DEFINE_bool("accept_data_change", False, "Resume or evaluate although the data differs "
                      "from the fingerprint in <workdir>/data.json (normalised as the run was; "
                      "recorded in changes.jsonl or eval.json).")
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
    flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() with auto-detection "
                      "(by itself where the environment shows several processes: Slurm's "
                      "srun, Open MPI, a TPU pod, JAX_COORDINATOR_ADDRESS; --nodistributed: "
                      "one process).")
    flags.DEFINE_bool("allow_cpu", False, "Run on the CPU although a GPU or TPU plugin is "
                      "installed (JAX fell back to the CPU); refused without it.")
    flags.DEFINE_string("compilation_cache", platform.default_compilation_cache(),
                        "Directory where compiled steps are kept for later runs ('' disables).")
    flags.mark_flags_as_required(["workdir"])
    FLAGS = flags.FLAGS
    for flag in FLAGS.get_key_flags_for_module(__name__):  # --helpshort: the main script's
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)


# What shows a job of several processes: srun's task count, Open MPI's world size, a TPU
# pod's workers, JAX's coordinator address (with JAX_NUM_PROCESSES and JAX_PROCESS_ID).
CLUSTER_VARIABLES = (("SLURM_STEP_NUM_TASKS", lambda value: int(value) > 1),
                     ("OMPI_COMM_WORLD_SIZE", lambda value: int(value) > 1),
                     ("TPU_WORKER_HOSTNAMES", lambda value: len(value.split(",")) > 1),
                     ("JAX_COORDINATOR_ADDRESS", bool))


def cluster_in_environment() -> str | None:
    """`NAME=value` of the first variable showing that this process is one of several
    (CLUSTER_VARIABLES), None for a process alone."""
    for name, several in CLUSTER_VARIABLES:
        value = os.environ.get(name, "")
        try:
            if value and several(value):
                return f"{name}={value}"
        except ValueError:
            continue
    return None


def start_distributed() -> None:
    """jax.distributed with the flags' coordinator, with JAX's cluster detection
    (--distributed), or, where the environment shows a job of several processes and no
    flag says otherwise (--nodistributed), by itself: every task of `srun python launch.py`
    then trains its share instead of stopping on the workdir's lock."""
    import jax

    explicit = FLAGS.coordinator_address or (FLAGS.num_processes or 1) > 1
    shown = None if FLAGS["distributed"].present else cluster_in_environment()
    if not (explicit or FLAGS.distributed or shown):
        return
    arguments = dict(coordinator_address=FLAGS.coordinator_address,
                     num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    if shown and not explicit and os.environ.get("JAX_COORDINATOR_ADDRESS"):
        arguments.update(num_processes=_environment_int("JAX_NUM_PROCESSES", shown),
                         process_id=_environment_int("JAX_PROCESS_ID", shown))
    if platform.running_on_cpu_only():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**arguments)
    except (ValueError, RuntimeError) as error:
        if explicit or FLAGS.distributed:
            raise
        cli.fail(f"error: the environment shows a job of several processes ({shown}) but "
                 f"jax.distributed cannot start from it ({cli.first_line(error, 200)}); "
                 "allowed: --distributed where JAX detects the cluster, --coordinator_address="
                 "HOST:PORT --num_processes=N --process_id=I, or --nodistributed (one process)")


def _environment_int(name: str, shown: str) -> int:
    value = os.environ.get(name, "")
    if not value.isdigit():
        cli.fail(f"error: {shown} without {name} (it is {value!r}); allowed: {name} set to "
                 "a number on every process, or the flags --coordinator_address, "
                 "--num_processes and --process_id")
    return int(value)


def refuse_cpu_fallback() -> None:
    """A GPU or TPU plugin installed while JAX runs on the CPU is refused (one line, the
    fix) unless --allow_cpu. Checked before anything is written; the run's first line
    (`platform.announce_runtime`) names what runs once every check has passed."""
    fallback = platform.cpu_fallback(platform.runtime())
    if fallback and not FLAGS.allow_cpu:
        cli.fail(f"error: {fallback}; allowed: fix the install, or run on the CPU with "
                 "--allow_cpu (or JAX_PLATFORMS=cpu)")


def check_mode(config, workdir: str) -> None:
    """Flag combinations that cannot work, refused before anything heavy is imported."""
    if FLAGS.mode == "eval" and FLAGS.overwrite:
        cli.fail("error: --overwrite is for --mode=train; --mode=eval changes no run")
    if FLAGS.mode == "train" and config is None and (
            FLAGS.overwrite or not os.path.exists(os.path.join(workdir, "config.json"))):
        cli.fail(f"error: --config is required to start a run in {workdir} (it holds no "
                 "config.json to resume); allowed: --config=<a config's name or file>")


def train_or_evaluate(config, workdir: str) -> dict:
    from cliquejax.train import evaluate, loop, run_dir

    if FLAGS.mode == "eval":
        return evaluate.evaluate_checkpoint(config, workdir, FLAGS.accept_data_change)
    if config is None:
        config = run_dir.load_config(workdir)  # resume the run as it was made
    return loop.train_and_evaluate(config, workdir, overwrite=FLAGS.overwrite,
                                   accept_data_change=FLAGS.accept_data_change)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def print_summary(results: dict, workdir: str) -> None:
    """What a user reads at the end (stderr, before the JSON line on stdout)."""
    if FLAGS.mode == "eval":
        lines = [f"step {results['step']}: test accuracy {_percent(results['test_accuracy'])}"
                 f", loss {results['test_loss']:.4g} on {results['examples']} examples",
                 f"written to {os.path.join(workdir, 'eval.json')}"]
    else:
        minutes, seconds = divmod(results["wall_seconds"] or 0.0, 60)
        best = _percent(results["best_test_accuracy"] if results["best_test_accuracy"] is not
                        None and results["best_test_accuracy"] >= 0 else None)
        lines = [f"done: {results['epochs']:g} epochs ({results['steps']} steps) in "
                 f"{int(minutes)} min {seconds:.0f} s; test accuracy "
                 f"{_percent(results['final_test_accuracy'])} final, {best} best (epoch "
                 f"{'-' if results['best_epoch'] is None else format(results['best_epoch'], 'g')})",
                 f"curves: {os.path.join(workdir, 'curves.png')}",
                 f"results: {os.path.join(workdir, 'results.json')}"]
    print("\n".join(lines), file=sys.stderr, flush=True)


def main(argv):
    from absl import logging

    cli.refuse_arguments(argv)
    logging.set_verbosity(logging.WARNING)
    config = cli.load_config_flag(FLAGS)
    workdir = cli.workdir_path(FLAGS.workdir)
    check_mode(config, workdir)
    from cliquejax import checkpoint, data
    from cliquejax.train import loop, preflight, run_dir

    if config is not None:
        try:
            preflight.check_fields_in_given_order(config, cli.config_overrides())
        except ValueError as error:
            cli.fail(f"error: {error}")

    platform.use_compilation_cache(FLAGS.compilation_cache)
    # From here a Ctrl-C unwinds: a workdir this session created is removed, a lock released.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        start_distributed()
        problem = platform.jax_environment_problem()  # before anything is written
        if problem:
            cli.fail(problem)
        refuse_cpu_fallback()
        results = train_or_evaluate(config, workdir)
    except KeyboardInterrupt:
        cli.fail(f"{cli.INTERRUPTED}; what {workdir} held before is kept (checkpoints: run "
                 "the same command to resume)", 130)
    except loop.Preempted as stop:
        print(str(stop), file=sys.stderr)
        sys.exit(stop.exit_code)
    except checkpoint.CheckpointSaveError as error:
        # A save that failed mid-write leaves Orbax's asynchronous writes abandoned; at a
        # normal exit Python and asyncio would report them (warnings, tracebacks) after the
        # one line a user must read last. Everything else is already written and closed.
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    except loop.NonFiniteError as error:
        cli.fail(f"error: {error}", 1)  # a failed run
    except run_dir.WorkdirLockedError as error:
        shown = cluster_in_environment()
        import jax

        if shown and jax.process_count() == 1:  # one task of several, each training alone
            cli.fail(f"error: {error}; this process is one task of a job of several "
                     f"({shown}) without jax.distributed: run the tasks as one job (drop "
                     "--nodistributed, or --distributed), or give each its own --workdir")
        cli.fail(f"error: {error}")
    except (ValueError, data.DatasetNotFoundError, checkpoint.CheckpointMismatchError,
            run_dir.ConfigMismatchError, FileNotFoundError) as error:
        cli.fail(f"error: {error}")
    except OSError as error:  # a write failing mid-run (disk full, permissions)
        cli.fail(f"error: {cli.one_line(error)}; the run stopped (the last checkpoint is "
                 "kept: run the same command to resume once the cause is fixed)", 1)
    import json

    import jax

    if jax.process_index() == 0:
        print_summary(results, workdir)
        print(json.dumps(results, sort_keys=True))


def run() -> None:
    """The command. Before the heavy imports: Ctrl-C is one line, and on a CPU host the
    process restarts with malloc's huge pages and XLA's CPU flags set."""
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    # A Ctrl-C held back until now (launch.py blocks it first thing; the huge-pages restart
    # blocks it across the re-execution) lands here, on the handler: one line.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    platform.restart_with_huge_pages()
    platform.configure_xla()
    define_flags()
    cli.run_app(main)


if __name__ == "__main__":
    run()
