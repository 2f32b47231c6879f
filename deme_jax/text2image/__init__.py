"""Text-to-image: prompts -> CLIP text states -> guided latent sampling -> VAE decode."""

from deme_jax.text2image.pipeline import SCHEDULERS, StableDiffusion, encode_prompts, generate
from deme_jax.text2image.tokenizer import CLIPTokenizer

__all__ = ["SCHEDULERS", "CLIPTokenizer", "StableDiffusion", "encode_prompts", "generate"]
