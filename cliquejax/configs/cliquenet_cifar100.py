"""CliqueNet on CIFAR-100: the CIFAR-10 recipe with 100 classes."""

from cliquejax.configs import cliquenet_cifar10


def get_config(arg=None):
    config = cliquenet_cifar10.get_config(arg)
    config.data.name = "cifar100"
    return config
