"""CliqueNet on CIFAR-10, the original recipe (docs/papers.md §1): Nesterov SGD 0.9, lr 0.1
divided by 10 at 50% and 75% of 300 epochs, batch 64, L2 1e-4 on every trainable variable,
dropout 0.2, no augmentation. Rows of Table 3: --config.model.k=64 --config.model.T=15 etc."""

from cliquejax.configs import default


def get_config(arg=None):
    config = default.get_config()
    config.model.name = "cliquenet"
    config.model.k = 36
    config.model.T = 12
    config.model.variant = "II+II"  # II+II | I+I | I+II | X
    config.model.x = 0  # variant X: layers per block that get the Stage-II update
    config.model.attention = False  # --if_a
    config.model.bottleneck = False  # --if_b
    config.model.compression = False  # --if_c
    config.model.dropout_rate = 0.2
    # BatchNorm as the original TensorFlow code has it: decay 0.999, epsilon 1e-3, the biased
    # batch variance in the moving average
    config.model.bn_momentum = 0.999
    config.model.bn_epsilon = 1e-3
    config.model.bn_running_var = "biased"
    config.model.unroll = True  # Python-unrolled layers (faster on CPU: benchmarks/README.md)

    config.data.name = "cifar10"
    config.data.augment = "none"  # the published errors are without augmentation
    config.train.epochs = 300
    config.train.batch_size = 64
    config.optimizer.lr = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 1e-4
    config.optimizer.weight_decay_on = "all"
    config.schedule.name = "step"
    config.schedule.boundaries = (0.5, 0.75)
    config.schedule.factor = 0.1
    return config
