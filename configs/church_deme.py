"""DeMe on google/ddpm-ema-church-256, the reference's LSUN-Church recipe.

    deme convert /path/to/ddpm-ema-church-256 /runs/ddpm_church
    deme finetune --config=configs/church_deme.py --workdir=/runs/church_deme \
        --config.deme.pretrained=/runs/ddpm_church
    deme merge --config=configs/church_deme.py --workdir=/runs/church_deme

Needs LSUN church_outdoor prepared for TFDS (array_record), see configs/church_ddpm.py.
The reference: N=4 intervals [0,250), [250,500), [500,750), [750,1000), p=0.3,
consistency weight 1, batch 16 x 4 gradient-accumulation steps, fp16. Here
the same: a batch of 64 per optimizer step, run as 4 microbatches of 16
(`config.train.grad_accum_steps`); compute is float32 (the reference used
fp16). The reference's merge weights were
[0.1, 0.1, 0.2, 0.5] (`--config.merge.search=none --config.merge.weights="(0.1,0.1,0.2,0.5)"`).
Hardware: the 6-level 256x256 UNet (113M parameters) holds the activations of
a 16-image microbatch per replica at a time (XLA:CPU's ahead-of-time estimate of
one replica's step temporaries, float32: 35 GiB, against 173 GiB for the 64
images at once; the whole step 37.1 GiB sequential, 49.7 GiB for N=4 stacked on
one device, benchmarks/deme_memory.py church): one 80 GB GPU trains all four
replicas; with 8 GPUs or TPU cores stacked
replicas use a replica=4 x data=2 mesh; mode="sequential" trains one replica at
a time. Each microbatch is split over a replica's `data` devices, so with more
than 16 of them lower grad_accum_steps (the same step in fewer, larger
microbatches).
Cost: 4 x 20K steps. Expected (paper, DDIM-50): FID 10.69 pretrained -> 7.27
merged, 9.57 for the timestep ensemble.
"""

from configs import deme


def get_config():
    config = deme.get_config()
    # N=4, p=0.3, consistency weight 1 and channel projections are the defaults (configs/deme.py).
    config.data.update(dict(name="lsun/church_outdoor", image_size=256, channels=3, random_flip=True))
    config.train.update(dict(batch_size=64, grad_accum_steps=4, num_steps=20_000, checkpoint_every=1_000,
                             eval_every=2_000, sample_every=5_000))
    config.eval.num_images = 500
    config.sample.update(dict(num_images=16, ddim_steps=50))
    # FID of DDIM-50 samples (the reference's LSUN sampling) against training images (FD-MNIST is for digits
    # only); the reference images are held in host memory, 10,000 at 256x256 take 2 GB.
    config.evaluate.update(dict(metrics=("fid",), reference="train", num_samples=10_000, num_reference=10_000,
                                ddim_steps=50, batch_size=64))
    return config
