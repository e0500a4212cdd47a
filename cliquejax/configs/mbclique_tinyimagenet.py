"""MBCliqueNet on 100-class Tiny ImageNet (docs/papers.md §3): 4 blocks x 6 layers, widths
64-128-128-160, K = 4, weight decay 1e-4, 64x64 images from an image folder
(--config.data.path=DIR with train/ and val/ class subfolders). Epochs are not given by the
source; 256, as for CIFAR, ends at the end of an SGDR cycle (cycles end at 2, 4, ..., 256)."""

from cliquejax.configs import mbclique_cifar10


def get_config(arg=None):
    config = mbclique_cifar10.get_config(arg)
    config.model.widths = (64, 128, 128, 160)
    config.model.layers = (6, 6, 6, 6)
    config.data.name = "image_folder"
    config.data.image_size = 64
    config.data.num_classes = 100
    config.optimizer.weight_decay = 1e-4
    config.schedule.min_lr = 1e-4
    config.train.epochs = 256
    return config
