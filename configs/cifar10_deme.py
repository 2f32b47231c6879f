"""DeMe on google/ddpm-cifar10-32, as the paper runs it: N=4, 20K iterations per replica.

    deme convert /path/to/ddpm-cifar10-32 /runs/ddpm_cifar10        # once: the released diffusers weights
    deme finetune --config=configs/cifar10_deme.py --workdir=/runs/cifar10_deme \
        --config.deme.pretrained=/runs/ddpm_cifar10
    deme merge --config=configs/cifar10_deme.py --workdir=/runs/cifar10_deme

Needs CIFAR-10 prepared for TFDS (array_record), see configs/cifar10_ddpm.py.
Hardware: 4 replicas of the 35.7M-parameter UNet stacked need about 4x one
model's training memory; 8 GPUs or a TPU v3-8 put 2 replicas per device pair
(mesh replica=4 x data=2). mode="sequential" trains one at a time on less memory.
Cost: 4 x 20K steps at batch 128, the compute of 80K DDPM steps (about 1/10 of
the 800K-step pretraining, so about an hour on a TPU v3-8 at Ho et al.'s speed).
Expected (paper, DDIM-100, 50K samples): FID 4.42 pretrained -> 3.51 merged.
The merge weights are searched here on the per-interval held-out loss; the
paper searched them by FID.
"""

from configs import deme


def get_config():
    config = deme.get_config()
    # N=4, p=0.3, consistency weight 1 and channel projections are the defaults (configs/deme.py).
    config.data.update(dict(name="cifar10", image_size=32, channels=3, random_flip=True))
    config.train.update(dict(batch_size=128, num_steps=20_000, checkpoint_every=2_000, eval_every=2_000,
                             sample_every=5_000))
    config.eval.num_images = 2_000
    config.sample.update(dict(num_images=64, ddim_steps=100))
    # The paper's FID: DDIM-100, 50,000 samples against the 50,000 training images.
    config.evaluate.update(dict(metrics=("fid",), reference="train", num_samples=50_000, ddim_steps=100,
                                batch_size=500))
    return config
