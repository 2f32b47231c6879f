"""The smallest real training run: a 2-level UNet on embedded MNIST digits, for tests."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.update(dict(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8, dropout=0.1,
    ))
    config.data.update(dict(name="mnist", image_size=32, channels=1, random_flip=True))
    config.train.update(dict(batch_size=8, num_steps=40, log_every=5, checkpoint_every=4, keep_checkpoints=20,
                             eval_every=10, sample_every=20))
    config.optim.update(dict(lr=1e-3, warmup_steps=2, schedule="cosine", decay_steps=40))
    config.eval.num_images = 16
    config.sample.update(dict(num_images=4, ddim_steps=3))
    return config
