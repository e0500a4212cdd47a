"""MBCliqueNet on SVHN (docs/papers.md §3): widths 64-64-128, K = 4, 32 epochs, SGDR 0.1 -> 1e-4.
Flip off by default (digits; --config.data.flip=True is the source's recipe)."""

from cliquejax.configs import mbclique_cifar10


def get_config(arg=None):
    config = mbclique_cifar10.get_config(arg)
    config.model.widths = (64, 64, 128)
    config.data.name = "svhn_cropped"
    config.data.flip = False
    config.train.epochs = 32
    config.schedule.min_lr = 1e-4
    return config
