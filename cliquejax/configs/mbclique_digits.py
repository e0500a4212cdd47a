"""The default run (`make run`): a small MBCliqueNet on scikit-learn's bundled 8x8 digits,
offline, small enough for a laptop CPU. Same recipe as the paper (SGD 0.9, weight decay
5e-4, SGDR 0.1 -> 1e-4 with cycles ending at epochs 2, 4, 8, ..., 64); no flip (mirrored
digits are other digits), pad-1 random crop."""

from cliquejax.configs import mbclique_cifar10


def get_config(arg=None):
    config = mbclique_cifar10.get_config(arg)
    config.model.widths = (32, 32, 64)
    config.model.layers = (3, 3, 3)
    config.data.name = "digits"
    config.data.flip = False
    config.data.crop_padding = 1
    config.train.epochs = 64  # the end of an SGDR cycle (2, 4, ..., 64): ends at the lowest lr
    config.train.batch_size = 64
    config.train.log_every_steps = 5
    config.schedule.min_lr = 1e-4
    return config
