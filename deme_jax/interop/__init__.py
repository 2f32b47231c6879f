"""Moving models between formats: diffusers directories and orbax checkpoints."""

from deme_jax.interop.unet import load_diffusers_unet, save_diffusers_unet

__all__ = ["load_diffusers_unet", "save_diffusers_unet"]
