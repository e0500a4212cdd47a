"""cliquejax: CliqueNet and MBCliqueNet in JAX/Flax."""

__version__ = "0.1.0"
