"""Schedules, noising, sampler steps and whole sampling runs against diffusers' schedulers.

Tensors are NHWC on both sides: the schedulers' ``step`` and ``add_noise`` are
elementwise, so the layout does not matter to them.
"""

import json

import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from deme_jax.diffusion import (
    NoiseSchedule,
    add_noise,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    epsilon_loss,
    inference_timesteps,
    make_schedule,
)
from deme_jax.diffusion import sampling
from deme_jax.interop.scheduler import load_diffusers_scheduler

pytestmark = pytest.mark.reference

# Tolerances (relative L2 error ||a - b|| / ||b||, float32 on both sides).
# Betas agree within one float32 ulp of torch's linspace (squaring doubles it),
# so schedules and add_noise agree to a few 1e-7. Steps follow diffusers' order
# of operations; their ulp-level differences are amplified by 1/sqrt(abar_t)
# (about 160 at t = 999) in the x0 prediction: 6e-8 x 160 = 1e-5 bounds them
# (measured <= 7e-7), while any formula error (a wrong alpha-bar index, variance or clip) is >= 1e-3.
SCHEDULE_RTOL = 1e-6
NOISE_RTOL = 1e-6
STEP_RTOL = 1e-5

SHAPE = (2, 8, 8, 3)
SCALED_LINEAR = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def normal(seed, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def to_torch(a):
    return torch.from_numpy(np.array(a, np.float32))


class ToyEps(nn.Module):
    """A one-parameter noise predictor, nonlinear in x and t."""

    @nn.compact
    def __call__(self, x, t):
        scale = self.param("scale", lambda key: jnp.float32(0.5))
        t = t.astype(jnp.float32)[:, None, None, None]
        return jnp.tanh(scale * x) * jnp.cos(t / 100) + 0.3 * jnp.sin(x * t / 500)


def toy_eps_torch(x, t, scale=0.5):
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.tanh(scale * x) * torch.cos(t / 100) + 0.3 * torch.sin(x * t / 500)


TOY_PARAMS = {"scale": jnp.float32(0.5)}


@pytest.fixture
def inject_ddpm_noise(monkeypatch):
    """Makes DDPMScheduler.step add the noise put in the returned holder instead of drawing its own."""
    holder = {}
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kwargs: holder["noise"])
    return holder


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    "kwargs",
    [dict(beta_schedule="linear"), SCALED_LINEAR, dict(beta_schedule="squaredcos_cap_v2"),
     dict(beta_schedule="linear", num_train_timesteps=50, beta_start=1e-3, beta_end=0.05)],
)
def test_schedule_matches_diffusers(kwargs):
    ours = make_schedule(**kwargs)
    theirs = DDPMScheduler(**kwargs)
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == jnp.float32
    np.testing.assert_allclose(ours.betas, theirs.betas.numpy(), rtol=SCHEDULE_RTOL, atol=0)
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=SCHEDULE_RTOL, atol=0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(beta_schedule="sigmoid"), "beta_schedule"),
        (dict(variance_type="learned_range"), "variance_type"),
        (dict(timestep_spacing="karras"), "timestep_spacing"),
        (dict(prediction_type="sample"), "prediction_type"),
    ],
)
def test_make_schedule_rejects_unsupported_values(kwargs, field):
    with pytest.raises(ValueError, match=f"{field}={next(iter(kwargs.values()))!r}.*supported values"):
        make_schedule(**kwargs)


def test_add_noise_matches_diffusers():
    schedule = make_schedule()
    x0, noise = normal(0, (5, 8, 8, 3)), normal(1, (5, 8, 8, 3))
    t = np.array([0, 1, 250, 998, 999])
    ours = add_noise(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    theirs = DDPMScheduler().add_noise(to_torch(x0), to_torch(noise), torch.from_numpy(t))
    assert rel_err(ours, theirs.numpy()) <= NOISE_RTOL


def test_epsilon_loss_is_per_example_mse():
    pred, noise = normal(0), normal(1)
    expected = ((pred - noise) ** 2).reshape(SHAPE[0], -1).mean(axis=1)
    np.testing.assert_allclose(epsilon_loss(jnp.asarray(pred), jnp.asarray(noise)), expected, rtol=1e-6)


# ---------------------------------------------------------------- timesteps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 3, 10, 61, 1000])
def test_inference_timesteps_match_set_timesteps(spacing, num_steps):
    scheduler = DDIMScheduler(timestep_spacing=spacing)
    scheduler.set_timesteps(num_steps)
    expected = scheduler.timesteps.numpy()
    # diffusers' trailing spacing yields a spurious extra timestep -1 for some
    # step counts (61 of 1000 is one); it is dropped here.
    expected = expected[expected >= 0]
    np.testing.assert_array_equal(inference_timesteps(make_schedule(timestep_spacing=spacing), num_steps), expected)


def test_inference_timesteps_rejects_offset_past_the_end():
    with pytest.raises(ValueError, match="steps_offset=1"):
        inference_timesteps(make_schedule(steps_offset=1), 1000)


# ---------------------------------------------------------------- single steps

DDIM_CONFIGS = [
    dict(clip_sample=True, timestep_spacing="leading", steps_offset=1),
    dict(clip_sample=False, timestep_spacing="leading", set_alpha_to_one=False),
    dict(clip_sample=True, clip_sample_range=0.5, timestep_spacing="trailing"),
    dict(clip_sample=False, timestep_spacing="trailing", **SCALED_LINEAR),
]


@pytest.mark.parametrize("config", DDIM_CONFIGS)
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_matches_diffusers(config, eta):
    schedule, scheduler = make_schedule(**config), DDIMScheduler(**config)
    scheduler.set_timesteps(10)
    for i in (0, 4, 9):  # first, middle and last step (prev_t < 0)
        t = int(scheduler.timesteps[i])
        x, eps, noise = normal(3 * i), normal(3 * i + 1), normal(3 * i + 2)
        ours = ddim_step(schedule, jnp.asarray(eps), t, t - 100, jnp.asarray(x), eta, jnp.asarray(noise))
        theirs = scheduler.step(to_torch(eps), t, to_torch(x), eta=eta, variance_noise=to_torch(noise)).prev_sample
        assert rel_err(ours, theirs.numpy()) <= STEP_RTOL, (t, i)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("num_inference_steps", [None, 10])
def test_ddpm_step_matches_diffusers(variance_type, clip_sample, num_inference_steps, inject_ddpm_noise):
    schedule = make_schedule(variance_type=variance_type, clip_sample=clip_sample)
    scheduler = DDPMScheduler(variance_type=variance_type, clip_sample=clip_sample)
    if num_inference_steps:
        scheduler.set_timesteps(num_inference_steps)
        timesteps = inference_timesteps(schedule, num_inference_steps)
    else:
        timesteps = np.arange(1000)[::-1]
    prev_timesteps = np.append(timesteps[1:], -1)
    for i in (0, len(timesteps) // 2, len(timesteps) - 2, len(timesteps) - 1):  # ends with t == 0
        t, prev_t = int(timesteps[i]), int(prev_timesteps[i])
        x, eps, noise = normal(3 * i), normal(3 * i + 1), normal(3 * i + 2)
        inject_ddpm_noise["noise"] = to_torch(noise)
        ours = ddpm_step(schedule, jnp.asarray(eps), t, prev_t, jnp.asarray(x), jnp.asarray(noise))
        theirs = scheduler.step(to_torch(eps), t, to_torch(x)).prev_sample
        assert rel_err(ours, theirs.numpy()) <= STEP_RTOL, (t, i)


def test_steps_accept_per_example_timesteps():
    schedule = make_schedule(variance_type="fixed_large")
    x, eps, noise = (jnp.asarray(normal(s)) for s in range(3))
    t, prev_t = jnp.array([999, 0]), jnp.array([998, -1])
    for step in (ddim_step, lambda *a: ddpm_step(*a[:-2], a[-1])):
        batched = step(schedule, eps, t, prev_t, x, 0.3, noise)
        for b in range(2):
            one = step(schedule, eps[b : b + 1], int(t[b]), int(prev_t[b]), x[b : b + 1], 0.3, noise[b : b + 1])
            np.testing.assert_allclose(batched[b : b + 1], one, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- whole runs


@pytest.mark.parametrize(
    "config, eta",
    [(dict(timestep_spacing="leading", steps_offset=1), 0.0), (dict(timestep_spacing="trailing", clip_sample=False), 0.5)],
)
def test_ddim_sample_matches_diffusers_loop(config, eta):
    model, schedule, scheduler = ToyEps(), make_schedule(**config), DDIMScheduler(**config)
    noise, rng = normal(10), jax.random.PRNGKey(0)
    ours = ddim_sample(model, TOY_PARAMS, schedule, jnp.asarray(noise), 10, eta=eta, rng=rng)

    keys = jax.random.split(rng, 10)  # the documented per-step noise
    scheduler.set_timesteps(10)
    x = to_torch(noise)
    for i, t in enumerate(scheduler.timesteps):
        variance_noise = to_torch(jax.random.normal(keys[i], SHAPE)) if eta > 0 else None
        x = scheduler.step(toy_eps_torch(x, t), t, x, eta=eta, variance_noise=variance_noise).prev_sample
    assert rel_err(ours, x.numpy()) <= STEP_RTOL


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_sample_matches_diffusers_loop(variance_type, inject_ddpm_noise):
    config = dict(num_train_timesteps=50, beta_end=0.2, variance_type=variance_type)
    model, schedule, scheduler = ToyEps(), make_schedule(**config), DDPMScheduler(**config)
    noise, rng = normal(11), jax.random.PRNGKey(1)
    ours = ddpm_sample(model, TOY_PARAMS, schedule, jnp.asarray(noise), rng)

    keys = jax.random.split(rng, 50)  # the documented per-step noise
    scheduler.set_timesteps(50)  # what DDPMPipeline does with num_inference_steps = T
    x = to_torch(noise)
    for i, t in enumerate(scheduler.timesteps):
        inject_ddpm_noise["noise"] = to_torch(jax.random.normal(keys[i], SHAPE))
        x = scheduler.step(toy_eps_torch(x, t), t, x).prev_sample
    assert rel_err(ours, x.numpy()) <= STEP_RTOL


def test_sampling_reuses_the_compiled_loop():
    model, schedule = ToyEps(), make_schedule()
    ddim_sample(model, TOY_PARAMS, schedule, jnp.asarray(normal(0)), 5)
    compiled = sampling._sample_loop._cache_size()
    ddim_sample(model, {"scale": jnp.float32(0.7)}, schedule, jnp.asarray(normal(1)), 5)
    ddim_sample(model, TOY_PARAMS, make_schedule(beta_end=0.03), jnp.asarray(normal(2)), 5)
    assert sampling._sample_loop._cache_size() == compiled


def test_ddim_sample_with_eta_needs_rng():
    with pytest.raises(ValueError, match="rng"):
        ddim_sample(ToyEps(), TOY_PARAMS, make_schedule(), jnp.asarray(normal(0)), 5, eta=1.0)


# ---------------------------------------------------------------- loading diffusers configs


def assert_same_schedule(ours: NoiseSchedule, theirs, **expected_fields):
    np.testing.assert_allclose(ours.betas, theirs.betas.numpy(), rtol=SCHEDULE_RTOL, atol=0)
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=SCHEDULE_RTOL, atol=0)
    for field, value in expected_fields.items():
        assert getattr(ours, field) == value, field


def test_load_ddpm_scheduler_directory(tmp_path):
    scheduler = DDPMScheduler(
        num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", variance_type="fixed_large", clip_sample=False
    )
    scheduler.save_pretrained(tmp_path)
    assert_same_schedule(
        load_diffusers_scheduler(tmp_path),
        scheduler,
        num_train_timesteps=500,
        variance_type="fixed_large",
        clip_sample=False,
        set_alpha_to_one=True,
    )


def test_load_ddim_scheduler_from_pipeline_directory(tmp_path):
    config = dict(
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing", clip_sample_range=2.0, **SCALED_LINEAR
    )
    scheduler = DDIMScheduler(**config)
    scheduler.save_pretrained(tmp_path / "scheduler")
    assert_same_schedule(
        load_diffusers_scheduler(str(tmp_path)),
        scheduler,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
        clip_sample_range=2.0,
        variance_type="fixed_small",
    )


def test_load_fills_missing_keys_with_diffusers_defaults(tmp_path):
    config = {"_class_name": "DDPMScheduler", "num_train_timesteps": 100}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    theirs = DDPMScheduler.from_config(config)
    assert_same_schedule(
        load_diffusers_scheduler(tmp_path),
        theirs,
        timestep_spacing=None,  # not given: each sampler uses its class's default
        **{k: theirs.config[k] for k in ("clip_sample", "clip_sample_range", "variance_type")},
    )


def test_load_trained_betas(tmp_path):
    betas = np.linspace(1e-3, 0.1, 20).tolist()
    scheduler = DDPMScheduler(num_train_timesteps=20, trained_betas=betas)
    scheduler.save_pretrained(tmp_path)
    assert_same_schedule(load_diffusers_scheduler(tmp_path), scheduler)


def test_load_missing_directory_names_what_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere[/\\]scheduler_config.json.*scheduler[/\\]"):
        load_diffusers_scheduler(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "scheduler, pattern",
    [
        (DDPMScheduler(beta_schedule="sigmoid"), r"beta_schedule='sigmoid'.*'linear', 'scaled_linear'"),
        (DDIMScheduler(prediction_type="sample"), r"prediction_type='sample'.*'epsilon', 'v_prediction'"),
        (DDPMScheduler(thresholding=True), r"thresholding=True.*False"),
        (DDPMScheduler(variance_type="learned_range"), r"variance_type='learned_range'.*'fixed_small', 'fixed_large'"),
    ],
)
def test_load_rejects_unsupported_configs(tmp_path, scheduler, pattern):
    scheduler.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=pattern) as info:
        load_diffusers_scheduler(tmp_path)
    assert "scheduler_config.json" in str(info.value)


def test_load_rejects_other_scheduler_classes(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler"}))
    with pytest.raises(ValueError, match=r"_class_name='EulerDiscreteScheduler'.*'DDPMScheduler', 'DDIMScheduler'"):
        load_diffusers_scheduler(tmp_path)
