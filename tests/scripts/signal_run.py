"""One of two localhost processes training a tiny digits run, where process 1 gets SIGTERM
after step SIGNAL_AT: `python signal_run.py PORT PROCESS_ID WORKDIR SIGNAL_AT`. Prints one
JSON line: the steps trained, the signal agreements started (each an exchange of the
processes' flags through JAX's coordination service, outside the steps) and the exit code.
test_distributed.py runs two of them."""

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from cliquejax import platform  # noqa: E402

platform.configure_xla()

import jax  # noqa: E402

from cliquejax.train import loop  # noqa: E402
from tests.conftest import tiny_digits_config  # noqa: E402


def main(port: str, process_id: str, workdir: str, signal_at: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(process_id))
    counted = {"steps": 0}

    class CountingFlag(loop.SignalFlag):  # the loop's own flag, counting what it is asked
        def stop_after(self, done):
            counted["steps"] += 1
            counted["agreements"] = self.agreements
            if jax.process_index() == 1 and done == int(signal_at):
                os.kill(os.getpid(), signal.SIGTERM)  # to the process, as a scheduler sends it
            stop = super().stop_after(done)
            counted["agreements"] = self.agreements
            return stop

    loop.SignalFlag = CountingFlag
    config = tiny_digits_config(epochs=1, batch_size=32, eval_batch_size=64)
    try:
        loop.train_and_evaluate(config, workdir)
        code = 0
    except loop.Preempted as stop:
        code = stop.exit_code
    print(json.dumps(dict(counted, exit_code=code)), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
