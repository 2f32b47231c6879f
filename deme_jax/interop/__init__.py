"""Moving models between formats: diffusers directories, orbax checkpoints, PyTorch pickles."""

from deme_jax.interop.checkpoint import load_orbax_unet, save_orbax_unet
from deme_jax.interop.convert import convert, load_unet
from deme_jax.interop.scheduler import load_diffusers_scheduler
from deme_jax.interop.unet import load_diffusers_unet, model_from_config, save_diffusers_unet

__all__ = [
    "convert",
    "load_diffusers_scheduler",
    "load_diffusers_unet",
    "load_orbax_unet",
    "load_unet",
    "model_from_config",
    "save_diffusers_unet",
    "save_orbax_unet",
]
