"""Train or evaluate a config:

    python launch.py --config=configs/mbclique_cifar10.py --workdir=runs/mbclique_cifar10
    python launch.py --config=configs/cliquenet_cifar10.py --config.model.k=64 --workdir=DIR
    python launch.py --config=... --workdir=DIR --mode=eval

Multi-host: every process runs the same command plus --coordinator_address=HOST:PORT
--num_processes=N --process_id=I, or --distributed to let JAX detect the cluster (SLURM, TPU).
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cliquejax import platform

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots, results.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (resuming) or evaluate.")
flags.DEFINE_bool("overwrite", False, "Move an old run of another model aside and start anew.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() with auto-detection.")
flags.DEFINE_string("compilation_cache", platform.default_compilation_cache(),
                    "Directory where compiled steps are kept for later runs ('' disables).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def start_distributed() -> None:
    import jax

    explicit = FLAGS.coordinator_address or (FLAGS.num_processes or 1) > 1
    if not (explicit or FLAGS.distributed):
        return
    if platform.running_on_cpu_only():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


def run(config, workdir: str) -> dict:
    from cliquejax.train import evaluate, loop

    if FLAGS.mode == "eval":
        return evaluate.evaluate_checkpoint(config, workdir)
    return loop.train_and_evaluate(config, workdir, overwrite=FLAGS.overwrite)


def main(argv):
    del argv
    from cliquejax import checkpoint, data
    from cliquejax.train import loop, run_dir

    logging.set_verbosity(logging.WARNING)
    platform.use_compilation_cache(FLAGS.compilation_cache)
    try:
        start_distributed()
        results = run(FLAGS.config, FLAGS.workdir)
    except loop.Preempted as stop:
        print(str(stop), file=sys.stderr)
        sys.exit(stop.exit_code)
    except (ValueError, data.DatasetNotFoundError, checkpoint.CheckpointMismatchError,
            run_dir.ConfigMismatchError, loop.NonFiniteError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1 if isinstance(error, loop.NonFiniteError) else 2)
    import jax

    if jax.process_index() == 0:
        print(json.dumps(results, sort_keys=True))


def run_app() -> None:
    """app.run, with config-override mistakes (raised while absl parses the flags) turned
    into one-line errors."""
    try:
        app.run(main)
    except (AttributeError, KeyError, TypeError, flags.Error) as error:
        text = " ".join(str(error).replace("\\n", " ").replace("\\", "").split())
        text = text[1:-1] if text[:1] in "'\"" and text[-1:] == text[:1] else text
        overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
        print(f"error: bad config override {' '.join(overrides)}: {text}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    platform.restart_with_huge_pages()
    platform.configure_xla()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    run_app()
