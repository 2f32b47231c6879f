"""The DDPM of Ho et al. on CIFAR-10: google/ddpm-cifar10-32's UNet (35.7M parameters).

    deme pretrain --config=configs/cifar10_ddpm.py --workdir=/runs/cifar10_ddpm

Needs CIFAR-10 prepared for TFDS in array_record format (once, with network):
    tfds build cifar10 --data_dir=$TFDS_DATA_DIR --file_format=array_record

Hardware: a TPU v3-8 / 8 GPUs, global batch 128 (Ho et al.'s recipe: Adam 2e-4
after 5k warm-up steps, dropout 0.1, EMA 0.9999, random flips).
Time: Ho et al. report 21 steps/s on a TPU v3-8, so the 800k steps take about
11 hours there; most DeMe work starts from the released checkpoint instead
(`deme convert ddpm-cifar10-32 ...`).
Expected: Ho et al. report FID 3.17 with 1000 ancestral steps; the DeMe paper
measures 4.42 for the released checkpoint with DDIM-100.
"""

from configs import default


def get_config():
    config = default.get_config()  # the defaults are this model: see configs/default.py
    config.data.update(dict(name="cifar10", image_size=32, channels=3, random_flip=True))
    config.train.update(dict(batch_size=128, num_steps=800_000))
    config.optim.update(dict(lr=2e-4, warmup_steps=5_000, schedule="constant"))
    return config
