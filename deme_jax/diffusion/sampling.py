"""DDPM, DDIM, DPM-Solver++ (2M) and PNDM samplers, step for step as diffusers' schedulers.

Every sampler follows one scan-friendly interface: ``make_plan`` fixes the
timesteps of a run, ``init_carry`` gives the state a sampler keeps between
steps, and ``sampler_step`` takes step ``i`` (a traced int32, 0 the noisiest).
The model input at step ``i`` is ``x`` itself at timestep ``plan.timesteps[i]``
and the initial noise is standard normal: none of these samplers scales either.

The sampling functions take a linen Module called as
``model.apply({"params": params}, x, t)`` with ``x`` NHWC float32 of shape
(B, H, W, C) and ``t`` int32 of shape (B,). A whole run is one ``lax.scan``
inside one ``jax.jit``; the module and the static configs are static, so a
second run with the same shapes reuses the compiled loop.

Per-step noise is ``jax.random.normal(keys[i], x.shape, x.dtype)`` with
``keys = jax.random.split(rng, num_steps)`` and ``i`` the index of the step in
the run, so a run can be replayed outside this module.
"""

from __future__ import annotations

import functools
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from deme_jax.diffusion.schedule import NoiseSchedule, check_choice, expand_to
from deme_jax.images import to_uint8

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "pndm")
# The timestep spacing of each sampler's diffusers class, used when the schedule does not give one.
DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "dpmpp_2m": "linspace", "pndm": "leading"}


def inference_timesteps(schedule: NoiseSchedule, num_inference_steps: int, sampler: str = "ddim") -> np.ndarray:
    """Descending int64 timesteps, as the ``set_timesteps`` of ``sampler``'s diffusers class."""
    T = schedule.num_train_timesteps
    if not 0 < num_inference_steps <= T:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, num_train_timesteps={T}]")
    spacing = schedule.timestep_spacing or DEFAULT_SPACING[sampler]
    # DPM-Solver spaces one point more for linspace and leading and drops the last one (t = 0).
    n = num_inference_steps + 1 if sampler == "dpmpp_2m" and spacing != "trailing" else num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1][:num_inference_steps].astype(np.int64)
    if spacing == "leading":
        timesteps = (np.arange(n) * (T // n))[::-1][:num_inference_steps].astype(np.int64) + schedule.steps_offset
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


@flax.struct.dataclass
class SamplerPlan:
    """The timesteps of one run: arrays are pytree leaves, the sampler and ``eta`` static.

    Step ``i`` calls the model at ``timesteps[i]`` and lands on
    ``prev_timesteps[i]`` (< 0: past the last timestep, where DDIM uses the
    schedule's ``final_alpha_cumprod``, DDPM alpha-bar 1 and DPM-Solver++ sigma 0).
    """

    timesteps: jax.Array  # (S,) int32, descending
    prev_timesteps: jax.Array  # (S,) int32
    sampler: str = flax.struct.field(pytree_node=False)
    eta: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def needs_noise(self) -> bool:
        """Whether ``sampler_step`` needs fresh noise at each step."""
        return self.sampler == "ddpm" or (self.sampler == "ddim" and self.eta > 0)


def make_plan(schedule: NoiseSchedule, sampler: str, num_inference_steps: int, eta: float = 0.0) -> SamplerPlan:
    """The plan of a ``num_inference_steps`` run of ``sampler`` (one of ``SAMPLERS``).

    DDIM and PNDM step back by ``num_train_timesteps // num_inference_steps``
    whatever the spacing, as diffusers does; DDPM and DPM-Solver++ step to the
    next timestep. PNDM is diffusers' ``PNDMScheduler`` with ``skip_prk_steps``
    (Stable Diffusion's configs; its Runge-Kutta warm-up is not implemented): its
    second model call repeats the second timestep, so ``num_inference_steps``
    steps call the model ``num_inference_steps + 1`` times (the plan's length).
    ``eta`` (DDIM only) scales DDIM's noise: 0 is deterministic, 1 is DDPM-like.
    """
    check_choice("sampler", sampler, SAMPLERS)
    if eta != 0 and sampler != "ddim":
        raise ValueError(f"eta={eta} applies to the ddim sampler only, not {sampler}")
    timesteps = inference_timesteps(schedule, num_inference_steps, sampler)
    ratio = schedule.num_train_timesteps // num_inference_steps
    if sampler == "pndm":
        if num_inference_steps > 1:  # PLMS: the second timestep twice, the first time from the first's provisional x
            timesteps = np.concatenate([timesteps[:2], timesteps[1:]])
        prev_timesteps = timesteps - ratio
        if num_inference_steps > 1:
            prev_timesteps[1] = timesteps[1]
    elif sampler == "ddim":
        prev_timesteps = timesteps - ratio
    else:
        prev_timesteps = np.append(timesteps[1:], -1)
    return SamplerPlan(jnp.asarray(timesteps, jnp.int32), jnp.asarray(prev_timesteps, jnp.int32), sampler, float(eta))


def init_carry(plan: SamplerPlan, x):
    """What a sampler keeps between steps (float32): DPM-Solver++ 2M the previous x0 prediction; PNDM its last
    three kept model outputs (oldest first) and the x of its first step; the others nothing."""
    if plan.sampler == "dpmpp_2m":
        return jnp.zeros(x.shape, jnp.float32)
    if plan.sampler == "pndm":
        return jnp.zeros((3, *x.shape), jnp.float32), jnp.zeros(x.shape, jnp.float32)
    return ()


def _alphas_cumprod_at(schedule: NoiseSchedule, t, fallback, x):
    """alpha-bar at ``t`` broadcast over ``x``; ``fallback`` where ``t < 0`` (past the last step)."""
    t = jnp.asarray(t)
    abar = jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], fallback)
    return expand_to(abar, x)


def _x0_and_eps(schedule: NoiseSchedule, model_output, x, alpha, sigma):
    """x0 and the noise implied by the model output for x = alpha x0 + sigma eps, as diffusers converts them."""
    if schedule.prediction_type == "epsilon":
        return (x - sigma * model_output) / alpha, model_output
    return alpha * x - sigma * model_output, alpha * model_output + sigma * x


def _predict_x0_and_eps(schedule: NoiseSchedule, model_output, x, abar_t):
    """DDPM's and DDIM's x0 (clipped as the schedule says) and noise."""
    x0, eps = _x0_and_eps(schedule, model_output, x, jnp.sqrt(abar_t), jnp.sqrt(1 - abar_t))
    if schedule.clip_sample:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    return x0, eps


def ddim_step(schedule: NoiseSchedule, model_output, t, prev_t, x, eta=0.0, noise=None) -> jax.Array:
    """One DDIM update x_t -> x_prev_t, as ``DDIMScheduler.step``.

    ``t``/``prev_t`` are scalars or (B,) ints; ``prev_t < 0`` steps to
    ``schedule.final_alpha_cumprod``. ``noise`` (standard normal, shape of x) is
    scaled by ``eta * sigma_t``; ``None`` means no noise term, as diffusers at eta 0.
    """
    abar_t = _alphas_cumprod_at(schedule, t, 0.0, x)
    abar_prev = _alphas_cumprod_at(schedule, prev_t, schedule.final_alpha_cumprod, x)
    beta_t = 1 - abar_t
    x0, eps = _predict_x0_and_eps(schedule, model_output, x, abar_t)
    variance = ((1 - abar_prev) / beta_t) * (1 - abar_t / abar_prev)
    std = eta * jnp.sqrt(variance)
    x_prev = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1 - abar_prev - std**2) * eps
    if noise is not None:
        x_prev = x_prev + std * noise
    return x_prev


def ddpm_step(schedule: NoiseSchedule, model_output, t, prev_t, x, noise) -> jax.Array:
    """One ancestral DDPM update x_t -> x_prev_t, as ``DDPMScheduler.step``.

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
    x0, _ = _predict_x0_and_eps(schedule, model_output, x, abar_t)
    mean = (jnp.sqrt(abar_prev) * current_beta) / beta_t * x0 + jnp.sqrt(alpha_t) * beta_prev / beta_t * x
    if schedule.variance_type == "fixed_small":
        variance = jnp.maximum(beta_prev / beta_t * current_beta, 1e-20)
    else:
        variance = current_beta
    std = jnp.where(expand_to(jnp.asarray(t), x) > 0, jnp.sqrt(variance), 0.0)
    return mean + std * noise


def _dpm_alpha_sigma_lambda(schedule: NoiseSchedule, t):
    """DPM-Solver's alpha, sigma and log-SNR lambda at scalar ``t`` (sigma 0 where ``t < 0``).

    The float32 arithmetic of ``DPMSolverMultistepScheduler``: alpha and sigma
    are recovered from its ``sigmas`` = sqrt((1 - abar) / abar).
    """
    abar = schedule.alphas_cumprod[jnp.maximum(t, 0)]
    ratio = jnp.where(t >= 0, jnp.sqrt((1 - abar) / abar), 0.0)
    alpha = 1 / jnp.sqrt(ratio**2 + 1)
    sigma = ratio * alpha
    return alpha, sigma, jnp.log(alpha) - jnp.log(sigma)


def dpm_solver_step(schedule: NoiseSchedule, plan: SamplerPlan, previous_x0, i, x, model_output):
    """One DPM-Solver++ 2M (midpoint) update, as ``DPMSolverMultistepScheduler.step``; returns (x_next, x0).

    ``previous_x0`` is the x0 prediction of step ``i - 1``. The first step, and
    the last one (down to sigma 0: diffusers' ``final_sigmas_type="zero"``), are
    first order. No clipping: diffusers' DPM-Solver has none.
    """
    alpha_t, sigma_t, lambda_t = _dpm_alpha_sigma_lambda(schedule, plan.prev_timesteps[i])
    alpha_s0, sigma_s0, lambda_s0 = _dpm_alpha_sigma_lambda(schedule, plan.timesteps[i])
    _, _, lambda_s1 = _dpm_alpha_sigma_lambda(schedule, plan.timesteps[jnp.maximum(i - 1, 0)])
    x0, _ = _x0_and_eps(schedule, model_output, x, alpha_s0, sigma_s0)
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    second_order = (i > 0) & (i < plan.num_steps - 1)
    d1 = jnp.where(second_order, 1.0 / (h_0 / h), 0.0) * (x0 - previous_x0)
    coef = alpha_t * (jnp.exp(-h) - 1.0)
    return (sigma_t / sigma_s0) * x - coef * x0 - 0.5 * coef * d1, x0


def pndm_step(schedule: NoiseSchedule, plan: SamplerPlan, carry, i, x, model_output):
    """Step ``i`` of PNDM with ``skip_prk_steps`` (linear multistep, PLMS), as ``PNDMScheduler.step_plms``; returns
    (x_next, carry).

    Step 0 moves ``x`` with its own output; step 1 restarts from step 0's ``x``
    with the mean of both outputs; then the outputs kept so far (step 1's is not
    kept) are combined by the Adams-Bashforth formulas of order 2, 3 and 4. The
    combined output is converted to a noise prediction (v-prediction) and x moved
    by PNDM's transfer formula (no clipping).
    """
    kept, first_x = carry
    oldest, older, last = kept[0], kept[1], kept[2]
    combined = jax.lax.switch(jnp.minimum(i, 4), [
        lambda: model_output,
        lambda: (model_output + last) / 2,
        lambda: (3 * model_output - last) / 2,
        lambda: (23 * model_output - 16 * last + 5 * older) / 12,
        lambda: (1 / 24) * (55 * model_output - 59 * last + 37 * older - 9 * oldest),
    ])
    ratio = schedule.num_train_timesteps // (plan.num_steps - 1) if plan.num_steps > 1 else 0
    t = jnp.where(i == 1, plan.timesteps[i] + ratio, plan.timesteps[i])
    sample = jnp.where(i == 1, first_x, x)
    abar_t = _alphas_cumprod_at(schedule, t, 0.0, x)
    abar_prev = _alphas_cumprod_at(schedule, plan.prev_timesteps[i], schedule.final_alpha_cumprod, x)
    if schedule.prediction_type == "v_prediction":
        combined = abar_t**0.5 * combined + (1 - abar_t) ** 0.5 * sample
    denominator = abar_t * (1 - abar_prev) ** 0.5 + (abar_t * (1 - abar_t) * abar_prev) ** 0.5
    x_next = (abar_prev / abar_t) ** 0.5 * sample - (abar_prev - abar_t) * combined / denominator
    kept = jnp.where(i == 1, kept, jnp.concatenate([kept[1:], model_output[None]]))
    return x_next, (kept, jnp.where(i == 0, x, first_x))


def sampler_step(schedule: NoiseSchedule, plan: SamplerPlan, carry, i, x, model_output, noise=None):
    """Step ``i`` of ``plan`` from ``x`` given the model's output at ``(x, plan.timesteps[i])``.

    Returns ``(x_next, carry)``, ``x_next`` in x's dtype. Jit- and scan-friendly
    in ``i``. ``noise`` is standard normal of x's shape when ``plan.needs_noise``,
    else ignored. The model output is converted to float32 first, as diffusers'
    DPM-Solver upcasts.
    """
    if plan.needs_noise and noise is None:
        raise ValueError(f"the {plan.sampler} sampler (eta={plan.eta}) adds noise at every step: pass noise")
    model_output, x32 = jnp.asarray(model_output, jnp.float32), jnp.asarray(x, jnp.float32)
    t, prev_t = plan.timesteps[i], plan.prev_timesteps[i]
    if plan.sampler == "dpmpp_2m":
        x_next, carry = dpm_solver_step(schedule, plan, carry, i, x32, model_output)
    elif plan.sampler == "pndm":
        x_next, carry = pndm_step(schedule, plan, carry, i, x32, model_output)
    elif plan.sampler == "ddim":
        x_next = ddim_step(schedule, model_output, t, prev_t, x32, plan.eta, noise if plan.eta > 0 else None)
    else:
        x_next = ddpm_step(schedule, model_output, t, prev_t, x32, noise)
    return x_next.astype(x.dtype), carry


@functools.partial(jax.jit, static_argnums=0)
def _sample_loop(model, params, schedule, plan, x, rng):
    """Scans the model and ``sampler_step`` over the plan; ``rng`` is None for a noise-free sampler."""
    keys = None if rng is None else jax.random.split(rng, plan.num_steps)

    def body(state, i):
        x, carry = state
        model_output = model.apply({"params": params}, x, jnp.full((x.shape[0],), plan.timesteps[i], jnp.int32))
        noise = None if keys is None else jax.random.normal(keys[i], x.shape, x.dtype)
        return sampler_step(schedule, plan, carry, i, x, model_output, noise), None

    (x, _), _ = jax.lax.scan(body, (x, init_carry(plan, x)), jnp.arange(plan.num_steps, dtype=jnp.int32))
    return x


def sample(model, params, schedule: NoiseSchedule, noise, sampler: str, num_inference_steps: int, eta=0.0,
           rng=None):
    """Denoises ``noise`` (B, H, W, C) in ``num_inference_steps`` steps of ``sampler``, as diffusers' pipelines.

    ``rng`` is needed (and used) only when the sampler adds noise: DDPM, DDIM with ``eta > 0``.
    """
    plan = make_plan(schedule, sampler, num_inference_steps, eta)
    if plan.needs_noise and rng is None:
        raise ValueError(f"the {sampler} sampler with eta={eta} adds noise at every step: pass rng")
    return _sample_loop(model, params, schedule, plan, noise, rng if plan.needs_noise else None)


def ddim_sample(model, params, schedule: NoiseSchedule, noise, num_inference_steps: int, eta=0.0, rng=None):
    """DDIM, as diffusers' ``DDIMPipeline``; ``rng`` only when ``eta > 0``."""
    return sample(model, params, schedule, noise, "ddim", num_inference_steps, eta, rng)


def ddpm_sample(model, params, schedule: NoiseSchedule, noise, rng):
    """Ancestral sampling through every training timestep T-1, ..., 0 (diffusers' ``DDPMPipeline`` default)."""
    return sample(model, params, schedule, noise, "ddpm", schedule.num_train_timesteps, rng=rng)


def dpm_sample(model, params, schedule: NoiseSchedule, noise, num_inference_steps: int):
    """DPM-Solver++ 2M, as a diffusers pipeline with ``DPMSolverMultistepScheduler.from_config``."""
    return sample(model, params, schedule, noise, "dpmpp_2m", num_inference_steps)


def sample_images(model, params, schedule, num: int, shape: tuple[int, int, int], rng: jax.Array, batch_size: int,
                  sampler: str = "ddim", ddim_steps: int = 50, eta: float = 0.0) -> np.ndarray:
    """``num`` uint8 samples of ``shape`` (H, W, C), drawn in batches, from the noise of ``rng``.

    ``ddim_steps`` is the step count of DDIM and DPM-Solver++; DDPM takes every
    training timestep. Batch k's noise comes from ``fold_in(rng, k)``, so the
    first images do not depend on ``num`` or on the model: two models sampled
    with one key start from the same noise.
    """
    steps = schedule.num_train_timesteps if sampler == "ddpm" else ddim_steps
    batches, done, start = [], 0, time.perf_counter()
    for k in range(-(-num // batch_size)):
        n = min(batch_size, num - done)
        rng_noise, rng_steps = jax.random.split(jax.random.fold_in(rng, k))
        noise = jax.random.normal(rng_noise, (batch_size, *shape))  # full batches: one compilation
        images = sample(model, params, schedule, noise, sampler, steps, eta, rng_steps)
        batches.append(to_uint8(np.asarray(images))[:n])
        done += n
        logging.info("sampled %d/%d images (%.0f s)", done, num, time.perf_counter() - start)
    return np.concatenate(batches)
