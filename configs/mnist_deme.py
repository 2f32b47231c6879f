"""DeMe on the shipped tiny MNIST DDPM (16x16 digits), sized for a 2-core CPU.

    deme finetune --config=configs/mnist_deme.py --workdir=/tmp/mnist_deme
    deme merge --config=configs/mnist_deme.py --workdir=/tmp/mnist_deme

The pretrained model ships with the package (deme_jax/assets/mnist16_ddpm,
from configs/mnist16_pretrain.py). N=4 replicas of 500 steps at batch 32;
the N=1 baseline at the same total iterations is
    deme finetune --config=configs/mnist_deme.py --workdir=/tmp/mnist_n1 \
        --config.deme.num_replicas=1 --config.deme.consistency_weight=0 \
        --config.deme.channel_projection=False --config.train.num_steps=2000
"""

from configs import deme
from deme_jax.assets import MNIST16_DDPM


def get_config():
    config = deme.get_config()
    config.deme.update(dict(pretrained=str(MNIST16_DDPM), num_replicas=4, global_prob=0.3,
                            consistency_weight=1.0, channel_projection=True))
    config.data.update(dict(name="mnist", image_size=16, channels=1, random_flip=False))
    config.train.update(dict(batch_size=32, num_steps=500, log_every=50, checkpoint_every=250, eval_every=250,
                             sample_every=0))
    config.optim.lr = 1e-4
    config.ema.max_decay = 0.999
    config.eval.num_images = 500
    config.merge.update(dict(search="grid", weight_values=(0.0, 0.5, 1.0)))
    return config
