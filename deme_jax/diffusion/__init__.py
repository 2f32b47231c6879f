"""Diffusion processes: noise schedules, forward noising, training targets, DDPM/DDIM/DPM-Solver++ sampling."""

from deme_jax.diffusion.sampling import (
    SAMPLERS,
    SamplerPlan,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    dpm_sample,
    dpm_solver_step,
    inference_timesteps,
    init_carry,
    make_plan,
    sample,
    sample_images,
    sampler_step,
)
from deme_jax.diffusion.schedule import NoiseSchedule, add_noise, epsilon_loss, make_schedule, prediction_target
from deme_jax.diffusion.weighting import min_snr_weight, p2_weight, snr

__all__ = [
    "SAMPLERS",
    "NoiseSchedule",
    "SamplerPlan",
    "add_noise",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "dpm_sample",
    "dpm_solver_step",
    "epsilon_loss",
    "inference_timesteps",
    "init_carry",
    "make_plan",
    "make_schedule",
    "min_snr_weight",
    "p2_weight",
    "prediction_target",
    "sample",
    "sample_images",
    "sampler_step",
    "snr",
]
