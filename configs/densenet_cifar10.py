"""DenseNet baseline (no bottleneck, no compression) with the CliqueNet CIFAR recipe.
Rows of Table 3: (k=12, T=36), (k=12, T=96), (k=24, T=96)."""

from configs import cliquenet_cifar10


def get_config(arg=None):
    config = cliquenet_cifar10.get_config(arg)
    config.model = config.model.__class__()
    config.model.name = "densenet"
    config.model.k = 12
    config.model.T = 36
    config.model.dropout_rate = 0.2
    return config
