"""MBCliqueNet on MNIST (docs/papers.md §3): widths 64-64-128, K = 4, 32 epochs, SGDR 0.1 -> 1e-4.
The source flips every data set; a mirrored digit is another digit, so the flip is off here
(--config.data.flip=True restores the source's recipe). Pad-4 crop at 28x28."""

from cliquejax.configs import mbclique_cifar10


def get_config(arg=None):
    config = mbclique_cifar10.get_config(arg)
    config.model.widths = (64, 64, 128)
    config.data.name = "mnist"
    config.data.flip = False
    config.train.epochs = 32
    config.schedule.min_lr = 1e-4
    return config
