"""Noise schedules, forward noising, training targets and the per-example loss.

Everything follows diffusers' schedulers so that a checkpoint trained there
samples identically here.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_choice(field: str, value, supported) -> None:
    """Raises a ValueError naming the field, the bad value and what is supported."""
    if value not in supported:
        raise ValueError(
            f"{field}={value!r} is not supported; supported values: "
            + ", ".join(repr(s) for s in supported)
        )


@flax.struct.dataclass
class NoiseSchedule:
    """Discrete-time schedule: arrays are pytree leaves, the rest is static config.

    One object serves every sampler, so it carries DDPM's ``variance_type`` and
    DDIM's ``set_alpha_to_one``; each sampler reads only what it needs.
    ``timestep_spacing`` None means "not given": each sampler then uses the
    default of its diffusers class, as ``from_config`` does with a config that
    lacks the key (Stable Diffusion's does).
    """

    betas: jax.Array  # (T,) float32
    alphas_cumprod: jax.Array  # (T,) float32
    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
    clip_sample: bool = flax.struct.field(pytree_node=False, default=True)
    clip_sample_range: float = flax.struct.field(pytree_node=False, default=1.0)
    variance_type: str = flax.struct.field(pytree_node=False, default="fixed_small")
    set_alpha_to_one: bool = flax.struct.field(pytree_node=False, default=True)
    steps_offset: int = flax.struct.field(pytree_node=False, default=0)
    timestep_spacing: str | None = flax.struct.field(pytree_node=False, default=None)
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")

    def __post_init__(self):
        check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
        check_choice("timestep_spacing", self.timestep_spacing, (None, *TIMESTEP_SPACINGS))
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)

    @property
    def final_alpha_cumprod(self) -> jax.Array:
        """The alpha-bar DDIM steps to past the last timestep (diffusers' ``final_alpha_cumprod``)."""
        return jnp.float32(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """``squaredcos_cap_v2`` (Nichol & Dhariwal): float64 Python math, then float32, as diffusers."""

    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, np.float32)


def make_schedule(
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    num_train_timesteps: int = 1000,
    trained_betas=None,
    clip_sample: bool = True,
    clip_sample_range: float = 1.0,
    variance_type: str = "fixed_small",
    set_alpha_to_one: bool = True,
    steps_offset: int = 0,
    timestep_spacing: str | None = None,
    prediction_type: str = "epsilon",
) -> NoiseSchedule:
    """Builds a schedule with diffusers' defaults and arithmetic.

    Betas are float32. The linspace is rounded once from float64, which stays
    within one float32 ulp of torch's float32 ``linspace`` (whose last bit
    depends on the CPU's vector width). ``alphas_cumprod`` is accumulated in
    float64 and rounded, which is what torch's CPU ``cumprod`` does for float32.
    """
    if trained_betas is not None:
        betas = np.asarray(trained_betas, np.float32)
        if betas.shape != (num_train_timesteps,):
            raise ValueError(
                f"trained_betas has shape {betas.shape}; expected ({num_train_timesteps},) "
                "to match num_train_timesteps"
            )
    else:
        check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        if beta_schedule == "linear":
            betas = np.linspace(beta_start, beta_end, num_train_timesteps).astype(np.float32)
        elif beta_schedule == "scaled_linear":
            root = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps).astype(np.float32)
            betas = root**2
        else:
            betas = _cosine_betas(num_train_timesteps)
    alphas_cumprod = np.cumprod(np.float32(1.0) - betas, dtype=np.float64).astype(np.float32)
    return NoiseSchedule(
        betas=jnp.asarray(betas),
        alphas_cumprod=jnp.asarray(alphas_cumprod),
        num_train_timesteps=int(num_train_timesteps),
        clip_sample=bool(clip_sample),
        clip_sample_range=float(clip_sample_range),
        variance_type=variance_type,
        set_alpha_to_one=bool(set_alpha_to_one),
        steps_offset=int(steps_offset),
        timestep_spacing=timestep_spacing,
        prediction_type=prediction_type,
    )


def expand_to(a: jax.Array, x: jax.Array) -> jax.Array:
    """Appends singleton axes so that a scalar or per-example (B,) value broadcasts over ``x``."""
    return jnp.reshape(a, jnp.shape(a) + (1,) * (x.ndim - jnp.ndim(a)))


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward process q(x_t | x_0) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, ``t`` int of shape (B,)."""
    abar = expand_to(schedule.alphas_cumprod[t], x0).astype(x0.dtype)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise


def prediction_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the model learns to output at ``t``: the noise, or v = sqrt(abar) noise - sqrt(1 - abar) x0
    (diffusers' ``get_velocity``) for v-prediction."""
    if schedule.prediction_type == "epsilon":
        return noise
    abar = expand_to(schedule.alphas_cumprod[t], x0).astype(x0.dtype)
    return jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * x0


def epsilon_loss(eps_pred: jax.Array, noise: jax.Array) -> jax.Array:
    """Per-example mean squared error in float32, shape (B,): callers weight and average it."""
    err = eps_pred.astype(jnp.float32) - noise.astype(jnp.float32)
    return jnp.mean(jnp.square(err), axis=tuple(range(1, err.ndim)))
