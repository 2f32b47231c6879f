"""A small DDPM on the 4,500 embedded MNIST training digits, sized for a 2-core CPU.

    deme pretrain --config=configs/mnist_tiny.py --workdir=/tmp/mnist_tiny

Hardware: a laptop or CI CPU (2 cores). Time: about 1.6 steps/s at batch 32 on
2 cores: the 2,000 steps took 22 minutes. Expected (measured): training and
held-out loss 0.022 at step 2,000, and a sample grid in workdir/samples where
many digits are recognisable (docs/mnist_tiny_samples.png); the loss is still
falling, so this is a smoke-sized run, not a converged model.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.update(dict(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8, dropout=0.0,
    ))
    config.data.update(dict(name="mnist", image_size=32, channels=1, random_flip=False))
    config.train.update(dict(batch_size=32, num_steps=2_000, log_every=50, checkpoint_every=250, eval_every=250,
                             sample_every=500))
    config.optim.update(dict(lr=1e-3, schedule="cosine", warmup_steps=100, decay_steps=2_000,
                             final_lr_fraction=0.05))
    config.ema.max_decay = 0.999
    config.eval.num_images = 256
    config.sample.update(dict(num_images=36, ddim_steps=50))
    return config
