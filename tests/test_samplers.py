"""The sampler interface (make_plan / init_carry / sampler_step), v-prediction and DPM-Solver++ 2M against
diffusers' schedulers built with ``from_config``, step for step, and the scheduler configs Stable Diffusion ships.

Tolerance: relative L2 error <= 3e-6 after every step, float32 on both sides.
Both sides evaluate the same float32 formulas in nearly the same order (XLA may
fuse a division by a square root into a reciprocal square root, or use an FMA),
so each step differs by a few ulp; the model output fed back (0.5 x + noise)
carries them on, and 25 steps end near 1e-6. A wrong timestep, alpha-bar index,
solver order or prediction conversion gives errors above 1e-3.
"""

import json
import re

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from deme_jax.diffusion import (
    dpm_sample,
    init_carry,
    make_plan,
    make_schedule,
    prediction_target,
    sample,
    sampler_step,
)
from deme_jax.interop import load_diffusers_scheduler, load_diffusers_unet
from tests.diffusers_util import random_unet, torch_forward

pytestmark = pytest.mark.reference

STEP_RTOL = 3e-6
# Stable Diffusion 1.x's scheduler/scheduler_config.json, as published (no timestep_spacing key).
SD1_CONFIG = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
              "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
              "trained_betas": None}
# Stable Diffusion 2.1's (768 px, v-prediction).
SD2_CONFIG = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
              "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
              "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
# google/ddpm-cifar10-32's (no timestep_spacing key either).
CIFAR10_CONFIG = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
                  "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000,
                  "trained_betas": None, "variance_type": "fixed_large"}
SCHEDULER_CLASSES = {"ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler, "pndm": PNDMScheduler}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def write_config(directory, config):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "scheduler_config.json").write_text(json.dumps(config))
    return directory


def diffusers_scheduler(sampler, directory):
    """The scheduler a diffusers user gets from ``Class.from_config(pipe.scheduler.config)``."""
    class_name = json.loads((directory / "scheduler_config.json").read_text())["_class_name"]
    pipe_scheduler = getattr(diffusers, class_name).from_pretrained(directory)
    return SCHEDULER_CLASSES[sampler].from_config(pipe_scheduler.config)


_jit_step = jax.jit(sampler_step)


def step_errors(sampler, config, num_steps, tmp_path):
    """Runs both schedulers on the same pseudo-random model, ``0.5 x + noise_i``; the error after each step."""
    directory = write_config(tmp_path / "scheduler", config)
    theirs = diffusers_scheduler(sampler, directory)
    theirs.set_timesteps(num_steps)
    schedule = load_diffusers_scheduler(directory)
    plan = make_plan(schedule, sampler, num_steps)
    np.testing.assert_array_equal(plan.timesteps, theirs.timesteps.numpy())

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    x_theirs, x_ours, carry, errors = torch.from_numpy(x), jnp.asarray(x), init_carry(plan, jnp.asarray(x)), []
    for i, t in enumerate(theirs.timesteps):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        x_theirs = theirs.step(torch.from_numpy(0.5 * x_theirs.numpy() + noise), t, x_theirs).prev_sample
        x_ours, carry = _jit_step(schedule, plan, carry, jnp.int32(i), x_ours, 0.5 * x_ours + noise)
        errors.append(rel_err(x_ours, x_theirs.numpy()))
    return errors


# ---------------------------------------------------------------- step for step against diffusers


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", [None, "linspace", "trailing"])  # None: DDIMScheduler's default, leading
def test_ddim_steps_match_diffusers(prediction_type, spacing, tmp_path):
    config = dict(SD1_CONFIG, prediction_type=prediction_type)
    if spacing:
        config["timestep_spacing"] = spacing
    assert max(step_errors("ddim", config, 10, tmp_path)) <= STEP_RTOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
# None: DPMSolverMultistepScheduler's default, linspace
@pytest.mark.parametrize("spacing", [None, "leading", "trailing"])
@pytest.mark.parametrize("num_steps", [10, 25])
def test_dpm_solver_steps_match_diffusers(prediction_type, spacing, num_steps, tmp_path):
    config = dict(SD1_CONFIG, prediction_type=prediction_type)
    if spacing:
        config["timestep_spacing"] = spacing
    assert max(step_errors("dpmpp_2m", config, num_steps, tmp_path)) <= STEP_RTOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", [None, "linspace", "trailing"])  # None: PNDMScheduler's default, leading
@pytest.mark.parametrize("num_steps", [1, 2, 5, 25])
def test_pndm_steps_match_diffusers(prediction_type, spacing, num_steps, tmp_path):
    """Stable Diffusion 1.x's own scheduler (PNDM, skip_prk_steps): the plan is diffusers' timesteps, the second
    one twice (num_steps + 1 model calls), and every step agrees, the warm-up's restart and each multistep
    order included."""
    config = dict(SD1_CONFIG, prediction_type=prediction_type, **({"timestep_spacing": spacing} if spacing else {}))
    errors = step_errors("pndm", config, num_steps, tmp_path)
    assert len(errors) == num_steps + (num_steps > 1)
    assert max(errors) <= STEP_RTOL


def test_dpm_solver_from_its_own_config(tmp_path):
    """A config DPMSolverMultistepScheduler wrote, with every key: trailing spacing, linear betas, 1 and 2 steps."""
    DPMSolverMultistepScheduler(timestep_spacing="trailing").save_pretrained(tmp_path / "scheduler")
    config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    for num_steps in (1, 2):
        assert max(step_errors("dpmpp_2m", config, num_steps, tmp_path)) <= STEP_RTOL


def test_dpm_sample_matches_diffusers_unet_loop(tmp_path):
    """A whole pixel-space run through a small random UNet2DModel, as a diffusers pipeline runs it."""
    unet = random_unet(sample_size=8, block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
    unet.save_pretrained(tmp_path / "unet")
    write_config(tmp_path / "scheduler", CIFAR10_CONFIG)
    noise = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)

    scheduler = diffusers_scheduler("dpmpp_2m", tmp_path / "scheduler")
    scheduler.set_timesteps(8)
    x = noise
    for t in scheduler.timesteps:
        model_output = torch.from_numpy(torch_forward(unet, x, np.full(2, int(t))))
        x = scheduler.step(model_output, t, torch.from_numpy(x)).prev_sample.numpy()

    model, params = load_diffusers_unet(tmp_path / "unet")
    ours = dpm_sample(model, params, load_diffusers_scheduler(tmp_path), jnp.asarray(noise), 8)
    # The UNets differ by up to ~1e-6 relative per call (see test_unet.py); eight steps carry that on.
    assert rel_err(ours, x) <= 1e-5


# ---------------------------------------------------------------- the interface


def test_ddpm_plan_follows_ddpm_scheduler():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    scheduler.set_timesteps(7)
    plan = make_plan(make_schedule(num_train_timesteps=100), "ddpm", 7)
    np.testing.assert_array_equal(plan.timesteps, scheduler.timesteps.numpy())
    expected_prev = [int(scheduler.previous_timestep(t)) for t in scheduler.timesteps]
    np.testing.assert_array_equal(plan.prev_timesteps, expected_prev)


def test_sampler_step_keeps_the_sample_dtype():
    schedule = make_schedule(**{k: SD1_CONFIG[k] for k in ("beta_start", "beta_end", "beta_schedule")})
    plan = make_plan(schedule, "dpmpp_2m", 5)
    x = jnp.ones((1, 4, 4, 4), jnp.bfloat16)
    x_next, carry = sampler_step(schedule, plan, init_carry(plan, x), jnp.int32(1), x, x)
    assert x_next.dtype == jnp.bfloat16 and carry.dtype == jnp.float32


def test_noisy_samplers_need_noise():
    schedule = make_schedule()
    for plan in (make_plan(schedule, "ddpm", 10), make_plan(schedule, "ddim", 10, eta=0.5)):
        x = jnp.zeros((1, 2, 2, 1))
        with pytest.raises(ValueError, match="pass noise"):
            sampler_step(schedule, plan, init_carry(plan, x), 0, x, x)
    with pytest.raises(ValueError, match="pass rng"):
        sample(None, {}, schedule, jnp.zeros((1, 2, 2, 1)), "ddpm", 10)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(sampler="euler"), r"sampler='euler'.*'ddpm', 'ddim', 'dpmpp_2m', 'pndm'"),
    (dict(sampler="dpmpp_2m", eta=1.0), r"eta=1.0 applies to the ddim sampler only"),
])
def test_make_plan_rejects(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_plan(make_schedule(), num_inference_steps=10, **kwargs)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_prediction_target(prediction_type):
    rng = np.random.default_rng(2)
    x0, noise = (rng.standard_normal((3, 4, 4, 2)).astype(np.float32) for _ in range(2))
    t = np.array([0, 500, 999])
    ours = prediction_target(make_schedule(prediction_type=prediction_type), jnp.asarray(x0), jnp.asarray(noise),
                             jnp.asarray(t))
    to_nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
    expected = noise if prediction_type == "epsilon" else (
        DDPMScheduler().get_velocity(to_nchw(x0), to_nchw(noise), torch.from_numpy(t)).permute(0, 2, 3, 1).numpy())
    assert rel_err(ours, expected) <= 1e-6


# ---------------------------------------------------------------- scheduler configs


@pytest.mark.parametrize("config, fields", [
    (SD1_CONFIG, dict(prediction_type="epsilon", set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                      timestep_spacing=None)),
    (SD2_CONFIG, dict(prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                      timestep_spacing=None)),
    (dict(SD2_CONFIG, timestep_spacing="trailing"), dict(prediction_type="v_prediction", timestep_spacing="trailing")),
])
def test_load_stable_diffusion_configs(config, fields, tmp_path):
    directory = write_config(tmp_path / "scheduler", config)
    schedule = load_diffusers_scheduler(tmp_path)
    for field, value in fields.items():
        assert getattr(schedule, field) == value, field
    for sampler in ("ddim", "dpmpp_2m"):  # each class's default spacing when the config gives none
        scheduler = diffusers_scheduler(sampler, directory)
        np.testing.assert_allclose(schedule.alphas_cumprod, scheduler.alphas_cumprod.numpy(), rtol=1e-6, atol=0)
        scheduler.set_timesteps(20)
        np.testing.assert_array_equal(make_plan(schedule, sampler, 20).timesteps, scheduler.timesteps.numpy())


def test_load_dpm_solver_config(tmp_path):
    DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction").save_pretrained(tmp_path)
    schedule = load_diffusers_scheduler(tmp_path)
    assert (schedule.prediction_type, schedule.timestep_spacing) == ("v_prediction", "linspace")


@pytest.mark.parametrize("option, value", [
    ("use_karras_sigmas", True),
    ("algorithm_type", "sde-dpmsolver++"),
    ("thresholding", True),
    ("solver_order", 3),
    ("solver_type", "heun"),
    ("final_sigmas_type", "sigma_min"),
    ("lambda_min_clipped", -5.1),
    ("variance_type", "learned_range"),
    ("rescale_betas_zero_snr", True),
])
def test_load_refuses_dpm_solver_options(option, value, tmp_path):
    DPMSolverMultistepScheduler(**{option: value}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"scheduler_config.json: {option}={value!r} is not supported")):
        load_diffusers_scheduler(tmp_path)
