"""``deme cache-latents --config=FILE --workdir=DIR``: encodes the image-caption pairs of config.data's split once
with the VAE and text encoder of config.deme.pretrained (a Stable Diffusion directory), for finetuning to read.

The cache goes to config.cache.dir (default DIR/latent_cache), in a subdirectory named after the split; running the
same command again finishes a killed run. Several processes (launch/) write a cache together, shard by shard.
"""

from pathlib import Path

import jax

from deme_jax import interop
from deme_jax.data import make_caption_source
from deme_jax.randomness import stream_seed
from deme_jax.text2image import build_latent_cache, latent_cache_dir
from deme_jax.text2image.latent_cache import check_cache_options
from deme_jax.train.workdir import WorkdirLock, job_id


def run(config, workdir):
    if not config.deme.pretrained:
        raise ValueError("config.deme.pretrained is empty: set it to the Stable Diffusion directory whose VAE and text "
                         "encoder encode the pairs.")
    if config.data.random_flip:
        raise ValueError("config.data.random_flip=True: cached latents are encoded once, unflipped; set "
                         "config.data.random_flip=False.")
    pipeline = interop.load_stable_diffusion(config.deme.pretrained)
    cache = config.cache
    # Before the scan of the data, which takes minutes on large folders.
    check_cache_options(pipeline, config.data.image_size, cache.shard_size, cache.batch_size, cache.dtype)
    source = make_caption_source(config.data, stream_seed(config.seed, "cache_crop"))
    path = latent_cache_dir(cache.dir, workdir, config.data.split)
    with WorkdirLock(path, job_id=job_id()):
        build_latent_cache(source, pipeline, path, model=str(Path(config.deme.pretrained).absolute()),
                           shard_size=cache.shard_size, batch_size=cache.batch_size, dtype=cache.dtype,
                           process_index=jax.process_index(), process_count=jax.process_count())
