"""Reads a diffusers scheduler config (DDPM, DDIM, PNDM, DPM-Solver multistep) into a ``NoiseSchedule``.

The schedule holds what every sampler shares (betas, prediction type, timestep
spacing, offsets); which sampler runs is chosen at sampling time, as a diffusers
user does with ``OtherScheduler.from_config(pipe.scheduler.config)``. Keys absent
from the file keep ``make_schedule``'s defaults, which are diffusers' defaults,
and an absent ``timestep_spacing`` stays "not given" so that each sampler uses
its own class's default.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from deme_jax.diffusion.schedule import NoiseSchedule, check_choice, make_schedule

SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler")
_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "clip_sample",
    "clip_sample_range",
    "variance_type",
    "set_alpha_to_one",
    "steps_offset",
    "timestep_spacing",
    "prediction_type",
)
# Options that change sampling in ways this port does not implement, with the values it accepts. PNDM's
# skip_prk_steps is not read: the "pndm" sampler is PNDM with it on, as Stable Diffusion's configs set it.
# DPM-Solver's lower_order_final / euler_at_final change nothing here (the last step is first order anyway
# when the final sigma is zero).
_ACCEPTED_OPTIONS = {
    "thresholding": (False,),
    "rescale_betas_zero_snr": (False,),
    "algorithm_type": ("dpmsolver++",),
    "solver_order": (2,),
    "solver_type": ("midpoint",),
    "final_sigmas_type": ("zero",),
    "use_karras_sigmas": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "lambda_min_clipped": (-math.inf,),
}


def load_diffusers_scheduler(path) -> NoiseSchedule:
    """Loads ``path/scheduler_config.json`` or, for a pipeline, ``path/scheduler/scheduler_config.json``."""
    return make_schedule(**diffusers_schedule_fields(path))


def diffusers_schedule_fields(path) -> dict:
    """``make_schedule``'s arguments (a run's ``config.diffusion``) from a diffusers scheduler config, as
    ``load_diffusers_scheduler`` reads it: the keys the file gives, unsupported options refused."""
    path = Path(path)
    candidates = [path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"]
    config_file = next((c for c in candidates if c.is_file()), None)
    if config_file is None:
        raise FileNotFoundError(
            f"no diffusers scheduler config at {candidates[0]} or {candidates[1]}: a scheduler "
            "directory (written by a diffusers scheduler's save_pretrained) holds scheduler_config.json, "
            "a pipeline directory holds it under scheduler/"
        )
    config = json.loads(config_file.read_text())
    try:
        if "_class_name" in config:
            check_choice("_class_name", config["_class_name"], SCHEDULER_CLASSES)
        if config.get("_class_name") == "DPMSolverMultistepScheduler":
            # There variance_type says whether the model also predicts its variance, not DDPM's posterior variance.
            check_choice("variance_type", config.pop("variance_type", None), (None,))
        for key, accepted in _ACCEPTED_OPTIONS.items():
            check_choice(key, config.get(key, accepted[0]), accepted)
        fields = {k: config[k] for k in _SCHEDULE_KEYS if k in config}
        make_schedule(**fields)  # refuses bad values now, naming the file
        return fields
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from e
