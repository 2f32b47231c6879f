"""Diffusion processes: noise schedules, forward noising, the epsilon loss, DDPM/DDIM sampling."""

from deme_jax.diffusion.sampling import (
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    inference_timesteps,
    sample_images,
)
from deme_jax.diffusion.schedule import NoiseSchedule, add_noise, epsilon_loss, make_schedule
from deme_jax.diffusion.weighting import min_snr_weight, p2_weight, snr

__all__ = [
    "NoiseSchedule",
    "add_noise",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "epsilon_loss",
    "inference_timesteps",
    "make_schedule",
    "min_snr_weight",
    "p2_weight",
    "sample_images",
    "snr",
]
