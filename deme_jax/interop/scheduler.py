"""Reads a diffusers ``DDPMScheduler``/``DDIMScheduler`` config into a ``NoiseSchedule``."""

from __future__ import annotations

import json
from pathlib import Path

from deme_jax.diffusion.schedule import NoiseSchedule, check_choice, make_schedule

SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler")
# Config keys that shape the schedule; keys absent from a file keep make_schedule's
# defaults, which are diffusers' defaults for both classes.
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
# Features this port does not implement, with the one value it accepts.
_UNSUPPORTED_FEATURES = {"thresholding": False, "rescale_betas_zero_snr": False}


def load_diffusers_scheduler(path) -> NoiseSchedule:
    """Loads ``path/scheduler_config.json`` or, for a pipeline, ``path/scheduler/scheduler_config.json``."""
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
        for key, accepted in _UNSUPPORTED_FEATURES.items():
            check_choice(key, config.get(key, accepted), (accepted,))
        return make_schedule(**{k: config[k] for k in _SCHEDULE_KEYS if k in config})
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from e
