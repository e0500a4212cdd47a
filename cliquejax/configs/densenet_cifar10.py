"""DenseNet baseline (no bottleneck, no compression) with the CliqueNet CIFAR recipe.
Rows of Table 3: (k=12, T=36), (k=12, T=96), (k=24, T=96)."""

from cliquejax.configs import cliquenet_cifar10


def get_config(arg=None):
    config = cliquenet_cifar10.get_config(arg)
    config.model = config.model.__class__()
    config.model.name = "densenet"
    config.model.k = 12
    config.model.T = 36
    config.model.dropout_rate = 0.2
    config.model.bn_momentum = 0.999  # BatchNorm as in the CliqueNet CIFAR code it is compared with
    config.model.bn_epsilon = 1e-3
    config.model.bn_running_var = "biased"
    return config
