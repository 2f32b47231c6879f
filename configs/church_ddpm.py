"""The DDPM of Ho et al. on LSUN church_outdoor 256x256: google/ddpm-ema-church-256's 6-level UNet.

    deme pretrain --config=configs/church_ddpm.py --workdir=/runs/church_ddpm

Needs LSUN church_outdoor prepared for TFDS in array_record format (once):
    tfds build lsun/church_outdoor --data_dir=$TFDS_DATA_DIR --file_format=array_record

Hardware: a TPU pod slice or a GPU cluster, global batch 64 (Ho et al.'s recipe:
Adam 2e-5, no dropout), here with bfloat16 compute and FSDP so that the 114M
parameters and Adam moments are spread over the devices.
Time: Ho et al. report 2.2 steps/s for their 256x256 models on a TPU v3-8, so
1.2M steps take about 6 days there. Expected: Ho et al. report FID 7.89; the DeMe
paper measures 10.69 for the released EMA checkpoint with DDIM-50.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.update(dict(
        sample_size=256,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        dropout=0.0,
        dtype="bfloat16",
    ))
    config.data.update(dict(name="lsun/church_outdoor", image_size=256, channels=3, random_flip=True))
    config.train.update(dict(batch_size=64, num_steps=1_200_000, checkpoint_every=10_000, sample_every=50_000))
    config.optim.update(dict(lr=2e-5, warmup_steps=5_000))
    config.eval.num_images = 256
    config.sample.num_images = 16
    config.mesh.fsdp = True
    return config
