"""cliquejax: CliqueNet and MBCliqueNet in JAX/Flax."""

import sys as _sys

__version__ = "0.1.0"

if _sys.argv[:1] == ["-m"]:  # `python -m cliquejax.<command>`: this runs before its imports
    from cliquejax import cli as _cli

    _cli.exit_on_interrupt()
