"""cliquejax: CliqueNet and MBCliqueNet in JAX/Flax."""

import sys as _sys

__version__ = "0.1.0"

# Commands whose writes are atomic replacements, or none: Ctrl-C may end them at any moment,
# with one line (`cli.exit_on_interrupt`). Installed here, as `python -m cliquejax.<command>`
# imports this package before the command's own imports (JAX), where Ctrl-C would otherwise
# print a traceback.
_ONE_LINE_INTERRUPT = ("cliquejax.export", "cliquejax.predict", "cliquejax.summary",
                       "cliquejax.lower", "cliquejax.standalone")
_command = getattr(_sys, "orig_argv", [])
if _sys.argv[:1] == ["-m"] and "-m" in _command[:-1] and \
        _command[_command.index("-m") + 1] in _ONE_LINE_INTERRUPT:
    from cliquejax import cli as _cli

    _cli.exit_on_interrupt()
elif _sys.argv[:1] and _sys.argv[0].endswith("cliquejax-train"):
    import signal as _signal

    # as launch.py's first line: a Ctrl-C waits until `launch.run` installs its handler
    _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGINT})
