"""The tiny DDPM that `deme demo` ships: 16x16 embedded MNIST digits, trained to convergence on a CPU.

    deme pretrain --config=configs/mnist16_pretrain.py --workdir=/tmp/mnist16
    deme convert /tmp/mnist16 /tmp/mnist16_orbax                    # the EMA weights
    deme convert /tmp/mnist16_orbax deme_jax/assets/mnist16_ddpm    # as shipped: a diffusers directory

Hardware: a 2-core CPU. Cost: 20,000 steps at batch 64, about 4 steps/s on 2
free cores (1.4 hours; longer when the cores are shared). The cosine decay to
1% of the learning rate lets the held-out loss settle: DeMe's premise is a
converged pretrained model, and an unconverged one simply keeps improving
under any finetuning.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.update(dict(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8, dropout=0.0,
    ))
    config.data.update(dict(name="mnist", image_size=16, channels=1, random_flip=False))
    config.train.update(dict(batch_size=64, num_steps=20_000, log_every=100, checkpoint_every=1_000,
                             eval_every=1_000, sample_every=5_000))
    config.optim.update(dict(lr=1e-3, schedule="cosine", warmup_steps=200, decay_steps=20_000,
                             final_lr_fraction=0.01))
    config.ema.max_decay = 0.9995
    config.eval.num_images = 500
    config.sample.update(dict(num_images=64, ddim_steps=50))
    return config
