"""Models on disk: diffusers and transformers directories (Stable Diffusion pipelines included), orbax
exports, training workdirs, PyTorch pickles; one loader for all."""

from deme_jax.interop.checkpoint import load_orbax_model, save_orbax_model
from deme_jax.interop.convert import convert
from deme_jax.interop.diffusers import load_diffusers_model, save_diffusers_model
from deme_jax.interop.load import is_training_workdir, load_model, load_run, load_schedule, run_config
from deme_jax.interop.lora import load_lora, save_lora
from deme_jax.interop.scheduler import load_diffusers_scheduler
from deme_jax.interop.stable_diffusion import load_stable_diffusion, save_stable_diffusion
from deme_jax.interop.unet import load_diffusers_unet, model_from_config, save_diffusers_unet

__all__ = [
    "convert",
    "is_training_workdir",
    "load_diffusers_model",
    "load_diffusers_scheduler",
    "load_diffusers_unet",
    "load_lora",
    "load_model",
    "load_orbax_model",
    "load_run",
    "load_schedule",
    "load_stable_diffusion",
    "model_from_config",
    "run_config",
    "save_diffusers_model",
    "save_diffusers_unet",
    "save_lora",
    "save_orbax_model",
    "save_stable_diffusion",
]
