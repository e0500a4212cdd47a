"""Fields shared by every config. A setting file starts from `get_config()` here and
overrides what its paper row needs. Every field can be overridden on the command line,
e.g. `--config.train.epochs=3`."""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "cliquenet"

    config.data = ml_collections.ConfigDict()
    # digits | cifar10 | cifar100 | svhn_cropped | mnist | npz | image_folder | synthetic
    config.data.name = "digits"
    # Where the TFDS data sets live; "": $TFDS_DATA_DIR or TFDS's default (~/tensorflow_datasets),
    # and the bundled digits built once in $XDG_CACHE_HOME/cliquejax (~/.cache/cliquejax)
    config.data.data_dir = ""
    config.data.path = ""  # npz file or image folder
    config.data.image_size = 0  # 0: the data set's own size; else resize (image_folder, synthetic)
    config.data.num_classes = 0  # 0: the data set's; else the count it must have (synthetic: makes)
    config.data.num_train = 0  # synthetic only
    config.data.num_test = 0  # synthetic only
    config.data.svhn_extra = False  # svhn_cropped: train on train+extra (the CliqueNet recipe)
    # cifar: flip + pad-and-crop below | imagenet: random-resized crop (+ flip) for training,
    # resize to 256/224 x size + centre crop for evaluation | none (cliquejax.data.augment)
    config.data.augment = "cifar"
    config.data.flip = False  # random horizontal flip (p=0.5), cifar and imagenet
    config.data.crop_padding = 0  # cifar: pad by this many pixels, then random crop back to size
    # Grain worker processes decoding image folders (and resized TFDS images): auto (none on
    # a CPU-only host, where the cores run the step; else one per core but one, at most 16)
    # | a number, as text ("0": in the main process; --config.data.worker_count=2). Data
    # sets held in memory need none: a batch is one gather, augmented on the device
    # (cliquejax.data.pipeline).
    config.data.worker_count = "auto"

    config.train = ml_collections.ConfigDict()
    config.train.epochs = 1
    config.train.batch_size = 64  # global, over all devices and hosts
    config.train.eval_batch_size = 256
    # auto (cliquejax/kernels.py: bfloat16 on a GPU or TPU, float32 on the CPU; config.json
    # records what ran) | float32 | bfloat16. Parameters, optimizer state, BatchNorm
    # statistics and the loss stay float32.
    config.train.compute_dtype = "auto"
    # Rematerialisation (gradient checkpointing): auto (per backend, cliquejax/kernels.py:
    # `layer` on the CPU, `none` elsewhere) | layer (recompute each clique layer / conv unit
    # in the backward pass) | layer_keep_1x1 | block (recompute each whole block) | none
    # (keep every activation). Same values and gradients.
    config.train.remat = "auto"
    # Which implementation of the operations runs (cliquejax/kernels.py): auto (the XLA:CPU
    # kernels of cliquejax/cpu/ when JAX runs on the CPU, else the stock JAX operations) |
    # reference (stock JAX operations on every backend) | cpu. Same values and gradients.
    config.train.kernels = "auto"
    # Whose statistics BatchNorm normalises with on several devices (cliquejax/train/step.py):
    # global (the whole batch's, as on one device; older runs without the field ran this) |
    # per_device (each device's shard, as PyTorch DataParallel/DDP without SyncBN computes;
    # MBCliqueNet section 3.1: "We implement our models in the Pytorch platform and training
    # it on two 1080Ti GPUs", which names no synchronised BN; one gradient all-reduce per
    # update). The default keeps the one-device numbers on any number of devices.
    config.train.bn_statistics = "global"
    config.train.log_every_steps = 50  # the `train_step` rows (TensorBoard, metrics.jsonl)
    # Peak FLOP/s of one device for the logged MFU; 0: the device kind's (cliquejax/targets),
    # and no MFU where it is not known (a CPU)
    config.train.peak_flops = 0.0
    config.train.eval_every_epochs = 1
    config.train.checkpoint_every_epochs = 1
    # >0: also a checkpoint every this many steps (within long epochs); resuming from one
    # continues as if uninterrupted
    config.train.checkpoint_every_steps = 0
    config.train.keep_checkpoints = 2
    config.train.max_steps = -1  # >0: stop after this many steps (tests, debugging)
    # START,END: a jax.profiler trace of steps START..END (1 = the first step) in the run
    # directory, for TensorBoard's profile plugin; () none
    config.train.profile_steps = ()

    config.optimizer = ml_collections.ConfigDict()
    # Any Optax optimizer by name (optax.<name>, given the schedule as its learning rate):
    # sgd | adam | adamw | lamb | lion | ...; its other arguments in `kwargs`.
    config.optimizer.name = "sgd"
    config.optimizer.lr = 0.1
    config.optimizer.momentum = 0.9  # sgd only (0: plain SGD)
    config.optimizer.nesterov = False  # sgd only
    # After each step, clip the latent weights of 1-bit layers to [-1, 1] (BinaryConnect's
    # rule; not the STE's gradient clip, `model.sign_fn`). No effect without 1-bit layers.
    config.optimizer.clip_latent = False
    # Keyword arguments of optax.<name> as written in the call, values Python literals:
    # "b1=0.95, weight_decay=0.05" for adamw. A string, so that the command line can set it
    # (--config.optimizer.kwargs="b1=0.95"); for sgd they override momentum / nesterov above.
    config.optimizer.kwargs = ""
    config.optimizer.weight_decay = 1e-4  # L2: wd * w added to the gradient (wd/2 w^2 in loss)
    config.optimizer.weight_decay_on = "all"  # all (trainable, as the originals) | kernels

    config.schedule = ml_collections.ConfigDict()
    config.schedule.name = "constant"  # constant | step | cosine | sgdr
    config.schedule.min_lr = 0.0  # cosine, sgdr
    config.schedule.boundaries = (0.5, 0.75)  # step: fractions of training
    config.schedule.factor = 0.1  # step: multiply at each boundary
    config.schedule.first_period_epochs = 2.0  # sgdr
    config.schedule.period_multiplier = 2.0  # sgdr
    # sgdr: summed (cycle i lasts first * multiplier**i: ends at 2, 6, 14, ... epochs) |
    # doubling (cycles end at first * multiplier**i: 2, 4, 8, ... epochs; MBCliqueNet's reading)
    config.schedule.sgdr_restarts = "summed"
    return config
