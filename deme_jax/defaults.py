"""The defaults of every config: training, DeMe finetuning and merging, and the CPU-sized MNIST setting.

The files in configs/ start from these and change a few fields; they live in
the package so that `deme demo` runs from an installed wheel as well.
"""

import ml_collections

from deme_jax.analyze import default_analyze_config
from deme_jax.assets import MNIST16_DDPM
from deme_jax.data import default_data_config
from deme_jax.deme import default_deme_config
from deme_jax.evaluate import default_evaluate_config
from deme_jax.merging import default_merge_config


def training_config() -> ml_collections.ConfigDict:
    """Every knob of a training run (pretraining defaults: the CIFAR-10 DDPM of Ho et al.)."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameters, data order, noise and timesteps all derive from it

    # UNet2D fields, named as in diffusers' UNet2DModel config.json.
    config.model = ml_collections.ConfigDict(dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=ml_collections.config_dict.placeholder(int),  # None: one head over all channels
        norm_num_groups=32,
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        dropout=0.1,
        channel_projection=False,  # DeMe's identity-initialised 1x1 projections
        dtype="float32",  # compute dtype; "bfloat16" keeps float32 parameters
    ))

    # The noise schedule (diffusers' DDPMScheduler fields).
    config.diffusion = ml_collections.ConfigDict(dict(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=True,
        variance_type="fixed_large",
    ))

    config.data = default_data_config()  # see deme_jax.data.default_data_config for each field
    config.data.update(dict(channels=3, random_flip=True))

    config.train = ml_collections.ConfigDict(dict(
        batch_size=128,  # global, over all devices and processes
        num_steps=800_000,
        log_every=100,
        checkpoint_every=5_000,
        keep_checkpoints=3,
        eval_every=5_000,  # held-out loss per timestep interval (0: never)
        sample_every=20_000,  # DDIM sample grid to TensorBoard and workdir/samples (0: never)
        loss_intervals=4,  # losses are also reported per equal timestep interval
    ))

    # AdamW with gradient clipping.
    config.optim = ml_collections.ConfigDict(dict(
        lr=2e-4,
        schedule="constant",  # or "cosine" (to lr * final_lr_fraction at decay_steps)
        warmup_steps=5_000,
        decay_steps=800_000,
        final_lr_fraction=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        grad_clip=1.0,
    ))

    # EMA of the parameters with warm-up: decay = min(max_decay, 1 - (1 + step / inv_gamma) ** -power).
    config.ema = ml_collections.ConfigDict(dict(max_decay=0.9999, inv_gamma=1.0, power=0.75))

    config.eval = ml_collections.ConfigDict(dict(num_images=500))  # held-out images for the loss
    config.sample = ml_collections.ConfigDict(dict(num_images=64, ddim_steps=50))
    config.mesh = ml_collections.ConfigDict(dict(fsdp=False))  # shard parameters over the data axis
    config.evaluate = default_evaluate_config()  # `deme evaluate`: see deme_jax.evaluate
    config.analyze = default_analyze_config()  # `deme analyze`: see deme_jax.analyze
    return config


def deme_config() -> ml_collections.ConfigDict:
    """DeMe finetuning and merging with the reference recipe's settings; the model comes from config.deme.pretrained."""
    config = training_config()
    del config["model"]
    config.deme = default_deme_config()
    config.merge = default_merge_config()
    # The reference: AdamW lr 5e-5 constant without warm-up, betas (0.95, 0.999), weight decay 1e-6, clip 1.0.
    config.optim.update(dict(lr=5e-5, schedule="constant", warmup_steps=0, b1=0.95, b2=0.999, eps=1e-8,
                             weight_decay=1e-6, grad_clip=1.0))
    # EMA with warm-up, inv_gamma 1, power 3/4, at most 0.9999: the EMA weights are merged.
    config.ema.update(dict(max_decay=0.9999, inv_gamma=1.0, power=0.75))
    return config


def mnist_deme_config() -> ml_collections.ConfigDict:
    """DeMe on the shipped tiny MNIST DDPM (16x16 digits), sized for a 2-core CPU (configs/mnist_deme.py)."""
    config = deme_config()
    config.deme.update(dict(pretrained=str(MNIST16_DDPM), num_replicas=4, global_prob=0.3,
                            consistency_weight=1.0, channel_projection=True))
    config.data.update(dict(name="mnist", image_size=16, channels=1, random_flip=False))
    config.train.update(dict(batch_size=32, num_steps=500, log_every=50, checkpoint_every=250, eval_every=250,
                             sample_every=0))
    # Twice the shipped model's final learning rate (its cosine ends at 1e-5): measured at 1e-4 (150 steps per
    # replica), every replica's task vector raised the held-out loss and the merge search kept the pretrained weights.
    config.optim.lr = 2e-5
    config.ema.max_decay = 0.999
    config.eval.num_images = 500
    config.merge.update(dict(search="grid", weight_values=(0.0, 0.5, 1.0)))
    return config
