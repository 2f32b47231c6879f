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

from deme_jax import defaults


def get_config():
    return defaults.mnist_deme_config()  # in the package: `deme demo` starts from it
