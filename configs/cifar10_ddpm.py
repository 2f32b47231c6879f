"""The DDPM of Ho et al. on CIFAR-10: google/ddpm-cifar10-32's UNet (35.7M parameters).

    deme pretrain --config=configs/cifar10_ddpm.py --workdir=/runs/cifar10_ddpm

Needs CIFAR-10 prepared for TFDS in array_record format (once, with network):
    tfds build cifar10 --data_dir=$TFDS_DATA_DIR --file_format=array_record

Hardware: sized for 8 GPUs (A100/H100 class) or a TPU v4-8, global batch 128.
Time: the original 800k steps take about 2-3 days there; most DeMe work starts
from the released checkpoint instead (`deme convert ddpm-cifar10-32 ...`).
Expected: FID about 3-4 with the EMA weights (the paper's pretrained model scores
4.42 with DDIM-100 in the DeMe evaluation).
"""

from configs import default


def get_config():
    config = default.get_config()  # the defaults are this model: see configs/default.py
    config.data.update(dict(name="cifar10", image_size=32, channels=3, random_flip=True))
    config.train.update(dict(batch_size=128, num_steps=800_000))
    config.optim.update(dict(lr=2e-4, warmup_steps=5_000, schedule="constant"))
    return config
