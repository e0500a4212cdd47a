"""launch.py that freezes itself (SIGSTOP) when its checkpoint of step STEP is written but
not yet committed: `python stop_mid_save.py STEP <launch.py's arguments>`. The save is then
in flight (its `<STEP>.orbax-checkpoint-tmp` directory complete, not renamed) until the
process gets SIGCONT: test_survive.py opens the run with the readers in between."""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from orbax.checkpoint._src.path import atomicity  # noqa: E402

from cliquejax import launch  # noqa: E402

STEP = sys.argv.pop(1)
finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def finalize_after_a_stop(self):
    if self._final_path.name == STEP and self._final_path.parent.name == "checkpoints":
        os.kill(os.getpid(), signal.SIGSTOP)  # the commit (a rename) is what is left
    return await finalize(self)


atomicity.AtomicRenameTemporaryPath.finalize = finalize_after_a_stop
launch.run()
