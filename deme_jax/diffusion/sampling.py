"""DDPM and DDIM samplers, step for step as diffusers' schedulers.

The model is a linen Module called as ``model.apply({"params": params}, x, t)``
with ``x`` NHWC float32 of shape (B, H, W, C) and ``t`` int32 of shape (B,); it
returns the predicted noise. A whole run is one ``lax.scan`` inside one
``jax.jit``; the module and the schedule's config are static, so a second run
with the same shapes reuses the compiled loop.

Per-step noise is ``jax.random.normal(keys[i], x.shape, x.dtype)`` with
``keys = jax.random.split(rng, num_steps)`` and ``i`` the index of the step in
the run (0 is the noisiest), so a run can be replayed outside this module.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from deme_jax.diffusion.schedule import NoiseSchedule, expand_to
from deme_jax.images import to_uint8


def inference_timesteps(schedule: NoiseSchedule, num_inference_steps: int) -> np.ndarray:
    """Descending int64 timesteps, as diffusers' ``set_timesteps`` for the schedule's spacing."""
    T = schedule.num_train_timesteps
    if not 0 < num_inference_steps <= T:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, num_train_timesteps={T}]")
    if schedule.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, num_inference_steps).round()[::-1].astype(np.int64)
    if schedule.timestep_spacing == "leading":
        ratio = T // num_inference_steps
        timesteps = (np.arange(num_inference_steps) * ratio)[::-1].astype(np.int64) + schedule.steps_offset
        if timesteps[0] >= T:
            raise ValueError(
                f"steps_offset={schedule.steps_offset} with {num_inference_steps} leading steps reaches "
                f"timestep {timesteps[0]}, past num_train_timesteps - 1 = {T - 1}"
            )
        return timesteps
    # trailing. For some step counts (61, 103, ... of 1000) the float arange
    # yields one extra value that rounds to timestep -1; diffusers keeps it and
    # indexes alpha-bar at -1, here it is dropped.
    timesteps = np.round(np.arange(T, 0, -T / num_inference_steps)).astype(np.int64) - 1
    return timesteps[:num_inference_steps]


def _alphas_cumprod_at(schedule: NoiseSchedule, t, fallback, x):
    """alpha-bar at ``t`` broadcast over ``x``; ``fallback`` where ``t < 0`` (past the last step)."""
    t = jnp.asarray(t)
    abar = jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], fallback)
    return expand_to(abar, x)


def _predict_x0(schedule: NoiseSchedule, eps, x, abar_t):
    """x0 implied by an epsilon prediction, clipped as the schedule says."""
    x0 = (x - jnp.sqrt(1 - abar_t) * eps) / jnp.sqrt(abar_t)
    if schedule.clip_sample:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    return x0


def ddim_step(schedule: NoiseSchedule, eps, t, prev_t, x, eta=0.0, noise=None) -> jax.Array:
    """One DDIM update x_t -> x_prev_t, as ``DDIMScheduler.step`` with epsilon prediction.

    ``t``/``prev_t`` are scalars or (B,) ints; ``prev_t < 0`` steps to
    ``schedule.final_alpha_cumprod``. ``noise`` (standard normal, shape of x) is
    scaled by ``eta * sigma_t``; ``None`` means no noise term, as diffusers at eta 0.
    """
    abar_t = _alphas_cumprod_at(schedule, t, 0.0, x)
    abar_prev = _alphas_cumprod_at(schedule, prev_t, schedule.final_alpha_cumprod, x)
    beta_t = 1 - abar_t
    x0 = _predict_x0(schedule, eps, x, abar_t)
    variance = ((1 - abar_prev) / beta_t) * (1 - abar_t / abar_prev)
    std = eta * jnp.sqrt(variance)
    x_prev = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1 - abar_prev - std**2) * eps
    if noise is not None:
        x_prev = x_prev + std * noise
    return x_prev


def ddpm_step(schedule: NoiseSchedule, eps, t, prev_t, x, noise) -> jax.Array:
    """One ancestral DDPM update x_t -> x_prev_t, as ``DDPMScheduler.step`` with epsilon prediction.

    ``prev_t < 0`` means alpha-bar 1. The variance is ``fixed_small`` (posterior,
    clamped at 1e-20) or ``fixed_large`` (1 - abar_t / abar_prev); ``noise`` is
    not added where ``t == 0``.
    """
    abar_t = _alphas_cumprod_at(schedule, t, 0.0, x)
    abar_prev = _alphas_cumprod_at(schedule, prev_t, 1.0, x)
    beta_t = 1 - abar_t
    beta_prev = 1 - abar_prev
    alpha_t = abar_t / abar_prev
    current_beta = 1 - alpha_t
    x0 = _predict_x0(schedule, eps, x, abar_t)
    mean = (jnp.sqrt(abar_prev) * current_beta) / beta_t * x0 + jnp.sqrt(alpha_t) * beta_prev / beta_t * x
    if schedule.variance_type == "fixed_small":
        variance = jnp.maximum(beta_prev / beta_t * current_beta, 1e-20)
    else:
        variance = current_beta
    std = jnp.where(expand_to(jnp.asarray(t), x) > 0, jnp.sqrt(variance), 0.0)
    return mean + std * noise


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sample_loop(model, step_fn, params, schedule, x, timesteps, prev_timesteps, keys, *step_args):
    """Scans ``step_fn`` over the timesteps; ``keys`` None means a noise-free sampler."""

    def body(x, inputs):
        t, prev_t, key = inputs
        eps = model.apply({"params": params}, x, jnp.full((x.shape[0],), t, jnp.int32))
        noise = None if key is None else jax.random.normal(key, x.shape, x.dtype)
        return step_fn(schedule, eps, t, prev_t, x, *step_args, noise), None

    x, _ = jax.lax.scan(body, x, (timesteps, prev_timesteps, keys))
    return x


def ddim_sample(model, params, schedule: NoiseSchedule, noise, num_inference_steps: int, eta=0.0, rng=None):
    """Denoises ``noise`` (B, H, W, C) with DDIM, as diffusers' ``DDIMPipeline``.

    Timesteps come from ``inference_timesteps``; each step goes back by
    ``num_train_timesteps // num_inference_steps`` whatever the spacing, as
    diffusers does. ``eta`` is a Python float; ``rng`` is needed (and used) only
    when ``eta > 0``.
    """
    timesteps = inference_timesteps(schedule, num_inference_steps)
    prev_timesteps = timesteps - schedule.num_train_timesteps // num_inference_steps
    if eta > 0 and rng is None:
        raise ValueError(f"ddim_sample with eta={eta} adds noise at every step: pass rng")
    keys = jax.random.split(rng, len(timesteps)) if eta > 0 else None
    return _sample_loop(
        model,
        ddim_step,
        params,
        schedule,
        noise,
        jnp.asarray(timesteps, jnp.int32),
        jnp.asarray(prev_timesteps, jnp.int32),
        keys,
        jnp.float32(eta),
    )


def ddpm_sample(model, params, schedule: NoiseSchedule, noise, rng):
    """Ancestral sampling through every training timestep T-1, ..., 0 (diffusers' ``DDPMPipeline`` default)."""
    timesteps = np.arange(schedule.num_train_timesteps)[::-1]
    keys = jax.random.split(rng, len(timesteps))
    return _sample_loop(
        model,
        ddpm_step,
        params,
        schedule,
        noise,
        jnp.asarray(timesteps, jnp.int32),
        jnp.asarray(timesteps - 1, jnp.int32),
        keys,
    )


def sample_images(model, params, schedule, num: int, shape: tuple[int, int, int], rng: jax.Array, batch_size: int,
                  sampler: str = "ddim", ddim_steps: int = 50, eta: float = 0.0) -> np.ndarray:
    """``num`` uint8 samples of ``shape`` (H, W, C), drawn in batches, from the noise of ``rng``.

    Batch k's noise comes from ``fold_in(rng, k)``, so the first images
    do not depend on ``num`` or on the model: two models sampled with one key
    start from the same noise.
    """
    batches, done, start = [], 0, time.perf_counter()
    for k in range(-(-num // batch_size)):
        n = min(batch_size, num - done)
        rng_noise, rng_steps = jax.random.split(jax.random.fold_in(rng, k))
        noise = jax.random.normal(rng_noise, (batch_size, *shape))  # full batches: one compilation
        if sampler == "ddim":
            images = ddim_sample(model, params, schedule, noise, ddim_steps, eta, rng_steps if eta > 0 else None)
        else:
            images = ddpm_sample(model, params, schedule, noise, rng_steps)
        batches.append(to_uint8(np.asarray(images))[:n])
        done += n
        logging.info("sampled %d/%d images (%.0f s)", done, num, time.perf_counter() - start)
    return np.concatenate(batches)
