"""MBCliqueNet on CIFAR-100: the CIFAR-10 setting with 100 classes (docs/papers.md §3)."""

from cliquejax.configs import mbclique_cifar10


def get_config(arg=None):
    config = mbclique_cifar10.get_config(arg)
    config.data.name = "cifar100"
    return config
