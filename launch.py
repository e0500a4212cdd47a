"""Train or evaluate a config: `python launch.py --config=configs/<name>.py --workdir=DIR`,
the checkout's entry to `cliquejax.launch` (installed: `cliquejax-train`), whose docstring
`--help` prints."""

import os
import signal
import sys

if __name__ == "__main__":
    # A Ctrl-C from the first line on waits (blocked, pending) until `launch.run` has
    # installed its one-line handler, instead of a traceback from an import.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # this checkout, configs/
    from cliquejax import launch

    __doc__ = launch.__doc__  # absl's usage text is the main module's docstring
    launch.run()
