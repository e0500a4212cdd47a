"""MBCliqueNet on CIFAR-10 (docs/papers.md §3): 3 blocks x 4 layers, widths 64-128-256, K = 4.
Recipe: SGD with Nesterov momentum 0.9 (SGDR's [20]), weight decay 5e-4, batch 128, flip +
pad-4 random crop, SGDR from 0.1 to 1e-5 (CIFAR) with cycles ending at epochs 2, 4, 8, ...,
256; 256 epochs; latent 1-bit filters clipped to [-1, 1] after each step (BinaryConnect [6]).
Another batch size B is the same recipe only with the learning rates scaled linearly,
lr = 0.1 * B / 128 and min_lr likewise (docs/papers.md, "MBCliqueNet training rule").
K ablation (widths 64-64-128): --config.model.widths=64,64,128 --config.model.K=8"""

from cliquejax.configs import default


def get_config(arg=None):
    config = default.get_config()
    m = config.model
    m.name = "mbcliquenet"
    m.widths = (64, 128, 256)
    m.layers = (4, 4, 4)
    m.K = 4
    m.binarize = True  # False: u-MBCliqueNet (full-precision filters, modulation kept)
    m.binarize_stem = False
    m.binarize_1x1 = True
    m.binarize_transition = True
    m.binarize_head = True
    m.sign_fn = "ste_sign"  # ste_sign | identity_ste | approx_sign
    m.update_order = "simultaneous"  # simultaneous | alternating (C first, then M)
    # The readings of the source's architecture (docs/papers.md, "MBCliqueNet parameter
    # counts": none of them gives the published counts; these are the best supported):
    m.clique_conv = "bottleneck"  # per layer 1x1 then modulated 3x3 | per_connection 3x3s
    m.stage_two_kernels = "shared"  # shared (eqs. 1-2, CliqueNet) | own_clique | own
    m.transition_kernel = 1  # 1 (CliqueNet) | 3 (the section 3.3 stem's "transition layer")
    m.transition_width = "next"  # next block's width | keep (CliqueNet's C -> C)
    m.attention = False  # CliqueNet's attentional transition (fully-connected layers)
    m.head_input = "x0_and_stage2"  # {X0, Stage II} (CliqueNet II+II) | stage2 (section 2)
    m.compression = False  # CliqueNet's 1x1 halving each head feature (its PyTorch code's)
    m.variant = "II+II"  # CliqueNet's variants (clique.VARIANTS): II+II is eqs. 1-2
    m.x = 0  # variant X: the layers of a block that get the Stage-II update
    m.dropout_rate = 0.0
    # "We implement our models in the Pytorch platform": nn.BatchNorm2d defaults (momentum
    # 0.1, i.e. 0.9 kept; eps 1e-5; the unbiased batch variance in the running estimate)
    m.bn_momentum = 0.9
    m.bn_epsilon = 1e-5
    m.bn_running_var = "unbiased"
    m.unroll = True

    config.data.name = "cifar10"
    config.data.augment = "cifar"
    config.data.flip = True
    config.data.crop_padding = 4
    config.train.epochs = 256
    config.train.batch_size = 128
    config.optimizer.lr = 0.1
    config.optimizer.momentum = 0.9
    # "SGD used in [20]": SGDR's SGD is Nesterov's, with the 0.9 / 5e-4 / 128 copied here
    config.optimizer.nesterov = True
    # BinaryConnect [6] / BNN [7], which section 2.3 follows: latent filters kept in [-1, 1]
    config.optimizer.clip_latent = True
    config.optimizer.weight_decay = 5e-4
    config.optimizer.weight_decay_on = "all"
    config.schedule.name = "sgdr"
    config.schedule.min_lr = 1e-5
    config.schedule.first_period_epochs = 2.0
    config.schedule.period_multiplier = 2.0
    # cycles end at epochs 2, 4, 8, ..., 256 (the paper's "2 epochs, and then 4, 8, ..., 128"
    # read so that its 32- and 256-epoch runs end at the minimum rate; see train/optim.py)
    config.schedule.sgdr_restarts = "doubling"
    return config
