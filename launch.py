"""Train or evaluate a config:

    python launch.py --config=configs/mbclique_cifar10.py --workdir=runs/mbclique_cifar10
    python launch.py --config=configs/cliquenet_cifar10.py --config.model.k=64 --workdir=DIR
    python launch.py --workdir=DIR               # resume DIR with its own config.json
    python launch.py --workdir=DIR --mode=eval   # evaluate DIR's latest good checkpoint

A workdir's config.json is the run's identity: resuming with a config that changes the run
is refused (--overwrite moves the old run into DIR/previous-<time>/ and starts anew). Its
data.json records the data read (a fingerprint) and its normalisation: resuming or
evaluating on data that changed is refused (--accept_data_change goes on, recording it).
Every check runs before anything is written (`cliquejax.train.preflight`).

Multi-host: every process runs the same command plus --coordinator_address=HOST:PORT
--num_processes=N --process_id=I, or --distributed to let JAX detect the cluster (SLURM, TPU).
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # this checkout, configs/
    from cliquejax.launch import run

    run()
