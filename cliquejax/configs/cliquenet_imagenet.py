"""CliqueNet-S0..S3 on ImageNet (docs/papers.md §2): `--config=configs/cliquenet_imagenet.py:S3`.

Recipe: SGD momentum 0.9 (not Nesterov), weight decay 1e-4, lr 0.1 x 0.1^(epoch // 30),
100 epochs, batch 160, random-resized-crop 224 + flip. Data: an image folder
(`--config.data.path=/imagenet` with train/ and val/ class subfolders)."""

from cliquejax.configs import default


def get_config(arg="S3"):
    config = default.get_config()
    config.model.name = "cliquenet_imagenet"
    config.model.setting = arg or "S3"
    config.model.channels = ()  # () takes the setting's k per block
    config.model.layers = ()  # () takes the setting's layers per block
    config.model.attention = True
    # the authors' PyTorch model: nn.BatchNorm2d defaults (momentum 0.1, i.e. 0.9 kept; eps
    # 1e-5; the unbiased batch variance in the running estimate)
    config.model.bn_momentum = 0.9
    config.model.bn_epsilon = 1e-5
    config.model.bn_running_var = "unbiased"
    config.model.unroll = True
    # Keep the k-channel 1x1 conv outputs of the bottleneck layers: the backward pass then
    # recomputes no convolution (faster on CPU for a little more memory: benchmarks/README.md).
    config.train.remat = "layer_keep_1x1"

    config.data.name = "image_folder"
    config.data.image_size = 224
    config.data.num_classes = 1000
    config.data.augment = "imagenet"  # random-resized crop 224 (+ flip); eval 256 -> 224
    config.data.flip = True
    config.train.epochs = 100
    config.train.batch_size = 160
    config.optimizer.lr = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = False
    config.optimizer.weight_decay = 1e-4
    config.schedule.name = "step"
    config.schedule.boundaries = (0.3, 0.6, 0.9)  # epochs 30, 60, 90 of 100
    config.schedule.factor = 0.1
    return config
