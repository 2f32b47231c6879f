"""DeMe on google/ddpm-ema-bedroom-256, the paper's LSUN-Bedroom run (the church recipe on bedrooms).

    deme convert /path/to/ddpm-ema-bedroom-256 /runs/ddpm_bedroom
    deme finetune --config=configs/bedroom_deme.py --workdir=/runs/bedroom_deme \
        --config.deme.pretrained=/runs/ddpm_bedroom
    deme merge --config=configs/bedroom_deme.py --workdir=/runs/bedroom_deme

Needs LSUN bedroom prepared for TFDS in array_record format (once; about 3M images):
    tfds build lsun/bedroom --data_dir=$TFDS_DATA_DIR --file_format=array_record
The released model has the church model's 6-level 256x256 UNet (113M
parameters), so the settings, hardware and cost are those of
configs/church_deme.py: N=4 intervals [0,250), [250,500), [500,750),
[750,1000), p=0.3, consistency weight 1, global batch 64 in 4 accumulated
microbatches of 16 (the reference's 16 x 4), 4 x 20K steps, float32 compute.
Expected (paper, as for the church run): FID 6.46 pretrained -> 5.84 merged.
"""

from configs import church_deme


def get_config():
    config = church_deme.get_config()  # the same 256x256 UNet, recipe and evaluation
    config.data.name = "lsun/bedroom"
    return config
