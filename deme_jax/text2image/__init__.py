"""Text-to-image: prompts -> CLIP text states -> guided latent sampling -> VAE decode; the latent cache that
finetuning reads."""

from deme_jax.text2image.latent_cache import (
    LatentCache,
    LatentStream,
    build_latent_cache,
    latent_cache_dir,
    open_latent_cache,
    weights_fingerprint,
)
from deme_jax.text2image.pipeline import SCHEDULERS, StableDiffusion, encode_prompts, generate
from deme_jax.text2image.tokenizer import CLIPTokenizer

__all__ = [
    "SCHEDULERS",
    "CLIPTokenizer",
    "LatentCache",
    "LatentStream",
    "StableDiffusion",
    "build_latent_cache",
    "encode_prompts",
    "generate",
    "latent_cache_dir",
    "open_latent_cache",
    "weights_fingerprint",
]
