"""CliqueNet on SVHN: train + extra, 40 epochs, otherwise the CIFAR recipe (docs/papers.md §1)."""

from cliquejax.configs import cliquenet_cifar10


def get_config(arg=None):
    config = cliquenet_cifar10.get_config(arg)
    config.data.name = "svhn_cropped"
    config.data.svhn_extra = True
    config.train.epochs = 40
    return config
