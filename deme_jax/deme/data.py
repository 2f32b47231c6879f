"""What DeMe's replicas train and are scored on: images for a pixel-space model; for Stable Diffusion, latents and
text states from the latent caches that ``deme cache-latents`` wrote.

A run is text-to-image when config.deme.pretrained is a Stable Diffusion directory. Its replicas read the cache of
config.data.split (the training pairs) and score held-out losses, in training and in the merge search, on the first
config.eval.num_images pairs of the cache of config.cache.heldout_split. Both caches must come from the pretrained
pipeline's VAE and text encoder (checked by their fingerprint).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from deme_jax.data import heldout_images, make_source
from deme_jax.data.stream import BatchStream
from deme_jax.randomness import stream_seed
from deme_jax.text2image import LatentStream, latent_cache_dir, open_latent_cache
from deme_jax.text2image.latent_cache import draw_examples
from deme_jax.train.validate import require


def is_text_to_image(config) -> bool:
    """Whether config.deme.pretrained is a Stable Diffusion directory (its UNet is what DeMe finetunes)."""
    return bool(config.deme.pretrained) and (Path(config.deme.pretrained) / "model_index.json").is_file()


def open_cache(config, workdir, split: str, fingerprint: str):
    """The complete latent cache of ``split`` for ``config`` (config.cache.dir, default ``workdir/latent_cache``),
    made by the encoders of ``fingerprint`` (``weights_fingerprint`` of the pretrained pipeline, computed once per
    run: it hashes the VAE and text encoder)."""
    path = latent_cache_dir(config.cache.dir, workdir, split)
    require(path.is_dir(), f"No latent cache of split {split!r} at {path}: run `deme cache-latents --config=... "
                           f"--workdir={workdir} --config.data.split={split}` first (config.cache.dir says where "
                           "caches live).")
    return open_latent_cache(path, fingerprint)


def replica_streams(config, workdir, fingerprint: str | None = None) -> list[BatchStream]:
    """Replica i's global batches (its ``data`` stream): its own order of the training set, the same in either mode
    and on any process. Text-to-image (``fingerprint`` given): ``{"latents", "text"}`` batches of the training
    split's cache."""
    seeds = [stream_seed(config.seed, "data", i) for i in range(config.deme.num_replicas)]
    if fingerprint is None:
        source = make_source(config.data)
        return [BatchStream(source, config.train.batch_size, seed=seed, random_flip=config.data.random_flip)
                for seed in seeds]
    cache = open_cache(config, workdir, config.data.split, fingerprint)
    return [LatentStream(cache, config.train.batch_size, seed=seed, caption_dropout=config.data.caption_dropout)
            for seed in seeds]


def heldout_batch(config, workdir, num: int, fingerprint: str | None = None, field: str = "config.eval.num_images"):
    """The first ``num`` (``field``) held-out examples as one batch: images, or (``fingerprint`` given)
    ``{"latents", "text"}`` of the held-out cache, each latent drawn once from its posterior (stream
    ``heldout_latents``), no caption dropout."""
    if fingerprint is None:
        return heldout_images(config.data, num)
    cache = open_cache(config, workdir, config.cache.heldout_split, fingerprint)
    require(0 < num <= len(cache), f"{field}={num} held-out pairs, but the cache of split "
                                   f"{config.cache.heldout_split!r} holds {len(cache)}: lower {field} or cache more "
                                   "held-out pairs.")
    seed = stream_seed(config.seed, "heldout_latents")
    return draw_examples(cache, range(num), [(*seed, row) for row in range(num)])


def batch_spec(config, stream: BatchStream):
    """The shapes and dtypes of one replica's global batch (float32 leaves)."""
    shapes = jax.tree_util.tree_map(np.shape, stream.batch(0))
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct((config.train.batch_size, *s[1:]), jnp.float32),
                                  shapes, is_leaf=lambda x: isinstance(x, tuple))


def rows(batch, index):
    """Rows ``index`` (a slice or indices) of a batch: an array or a pytree of arrays."""
    return jax.tree_util.tree_map(lambda x: x[index], batch)


def num_rows(batch) -> int:
    return len(jax.tree_util.tree_leaves(batch)[0])
