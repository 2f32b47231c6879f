"""Per-timestep loss weights: the re-weighting baselines DeMe is compared with.

Each is defined on the epsilon loss and returned for the schedule's own
prediction target, so a v-prediction model is trained with the same objective
(as diffusers' Min-SNR training does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deme_jax.diffusion.schedule import NoiseSchedule


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alpha-bar / (1 - alpha-bar) at integer timesteps ``t``."""
    abar = schedule.alphas_cumprod[t]
    return abar / (1.0 - abar)


def epsilon_loss_per_target_loss(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """The epsilon loss over the loss of the schedule's target at the same ``x_t``: 1 for epsilon prediction,
    alpha-bar for v-prediction (v - v' = (eps - eps') / sqrt(alpha-bar))."""
    if schedule.prediction_type == "epsilon":
        return jnp.ones(jnp.shape(t), jnp.float32)
    return schedule.alphas_cumprod[t]


def min_snr_weight(schedule: NoiseSchedule, t: jax.Array, gamma: float = 5.0) -> jax.Array:
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR on the epsilon loss, min(SNR, gamma) / (SNR + 1) on
    the v loss."""
    s = snr(schedule, t)
    return jnp.minimum(s, gamma) / s * epsilon_loss_per_target_loss(schedule, t)


def p2_weight(schedule: NoiseSchedule, t: jax.Array, gamma: float = 1.0, k: float = 1.0) -> jax.Array:
    """P2 weighting (Choi et al. 2022): 1 / (k + SNR) ** gamma on the epsilon loss."""
    return epsilon_loss_per_target_loss(schedule, t) / (k + snr(schedule, t)) ** gamma
