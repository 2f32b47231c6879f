"""DeMe on Stable Diffusion v1.4 (or v1.5), the paper's text-to-image recipe.

    deme cache-latents --config=configs/sd15_deme.py --workdir=/runs/sd15_deme \
        --config.deme.pretrained=/models/stable-diffusion-v1-4 --config.data.folder=/data/laion_aes65
    deme cache-latents ... --config.data.split=heldout       # the same, for the held-out pairs
    deme finetune --config=configs/sd15_deme.py --workdir=/runs/sd15_deme \
        --config.deme.pretrained=/models/stable-diffusion-v1-4 --config.data.folder=/data/laion_aes65
    deme merge --config=configs/sd15_deme.py --workdir=/runs/sd15_deme

config.deme.pretrained is a diffusers Stable Diffusion directory (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/); its scheduler gives the noise schedule. The paper finetunes on the LAION-Aesthetics V2
6.5+ subset of BK-SDM (212,776 image-text pairs): an image folder with a captions.jsonl ({"file_name", "text"}
per line) or a name.txt beside each image. Images are resized on the shorter side and center-cropped to 512x512;
1% of the folder is held out (chosen by path hash) for the held-out loss and the merge search. `deme cache-latents`
encodes the pairs once (VAE posterior and CLIP text states, float16 on disk: about 150 KB a pair, 32 GB for the
subset), so finetuning runs neither encoder.

The recipe: N=4 equal intervals, p=0.3, consistency weight 1, channel projections, AdamW lr 5e-5 (betas
0.95/0.999, weight decay 1e-6, clip 1), 20K iterations per replica at a batch of 256 (BK-SDM's 64 x 4 gradient
accumulation; the paper states the model, N and the iterations, the rest is BK-SDM's setting). Here the batch of
256 is 8 microbatches of 32, compute in bfloat16 with per-block rematerialisation.
Hardware: one full SD-1.x replica's state (weights, Adam moments, EMA) is 13.8 GB in float32, beside the frozen
teacher (3.4 GB). On 8 80-GB GPUs stacked replicas take a replica=4 x data=2 mesh (one replica per pair of GPUs,
16 images per GPU per microbatch). On fewer devices use mode="sequential" with config.mesh.fsdp=True (each replica
split over all devices), or LoRA replicas (configs/sd15_deme_lora.py).
Cost: 4 replicas x 20K steps x 256 images = 20.5M student forward and backward passes plus teacher forwards.
Expected (paper, SD v1.4; 30K MS-COCO val captions, 25 steps, guidance 7.5, FID at 256x256): FID 13.42 -> 13.06,
CLIP score 29.88 -> 30.11.
"""

from configs import deme


def get_config():
    config = deme.get_config()
    # N=4, p=0.3, consistency weight 1, channel projections and the optimizer are the defaults (configs/deme.py).
    config.deme.update(dict(dtype="bfloat16", remat=True))
    config.data.update(dict(name="folder", image_size=512, channels=3, random_flip=False, heldout_fraction=0.01,
                            caption_dropout=0.1))
    config.cache.update(dict(heldout_split="heldout", dtype="float16", shard_size=1024, batch_size=32))
    config.train.update(dict(batch_size=256, grad_accum_steps=8, num_steps=20_000, checkpoint_every=1_000,
                             eval_every=2_000, sample_every=5_000, log_every=50))
    config.eval.num_images = 256
    config.sample.update(dict(num_images=8, ddim_steps=25, guidance_scale=7.5))
    # The COCO protocol the paper's numbers follow: PNDM (the checkpoint's own scheduler), 25 steps, guidance 7.5,
    # FID at 256x256; give the captions, the reference statistics and the CLIP model on the command line.
    config.evaluate.update(dict(sampler="pndm", ddim_steps=25, guidance_scale=7.5, fid_resolution=256,
                                metrics=("fid", "clip_score"), batch_size=32))
    return config
