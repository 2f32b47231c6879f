"""Models on disk: diffusers directories, orbax exports, training workdirs, PyTorch pickles; one loader for all."""

from deme_jax.interop.checkpoint import load_orbax_unet, save_orbax_unet
from deme_jax.interop.convert import convert
from deme_jax.interop.load import is_training_workdir, load_model, load_run, load_schedule, run_config
from deme_jax.interop.scheduler import load_diffusers_scheduler
from deme_jax.interop.unet import load_diffusers_unet, model_from_config, save_diffusers_unet

__all__ = [
    "convert",
    "is_training_workdir",
    "load_diffusers_scheduler",
    "load_diffusers_unet",
    "load_model",
    "load_orbax_unet",
    "load_run",
    "load_schedule",
    "model_from_config",
    "run_config",
    "save_diffusers_unet",
    "save_orbax_unet",
]
