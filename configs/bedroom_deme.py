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

from configs import deme


def get_config():
    config = deme.get_config()
    # N=4, p=0.3, consistency weight 1 and channel projections are the defaults (configs/deme.py).
    config.data.update(dict(name="lsun/bedroom", image_size=256, channels=3, random_flip=True))
    config.train.update(dict(batch_size=64, grad_accum_steps=4, num_steps=20_000, checkpoint_every=1_000,
                             eval_every=2_000, sample_every=5_000))
    config.eval.num_images = 500
    config.sample.update(dict(num_images=16, ddim_steps=50))
    # FID of DDIM-100 samples against training images (FD-MNIST is for digits only); the reference images are
    # held in host memory, 10,000 at 256x256 take 2 GB.
    config.evaluate.update(dict(metrics=("fid",), reference="train", num_samples=10_000, num_reference=10_000,
                                ddim_steps=100, batch_size=64))
    return config
