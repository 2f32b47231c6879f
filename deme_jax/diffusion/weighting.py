"""Per-timestep weights of the epsilon loss: the re-weighting baselines DeMe is compared with."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deme_jax.diffusion.schedule import NoiseSchedule


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alpha-bar / (1 - alpha-bar) at integer timesteps ``t``."""
    abar = schedule.alphas_cumprod[t]
    return abar / (1.0 - abar)


def min_snr_weight(schedule: NoiseSchedule, t: jax.Array, gamma: float = 5.0) -> jax.Array:
    """Min-SNR-gamma (Hang et al. 2023) for epsilon prediction: min(SNR, gamma) / SNR."""
    s = snr(schedule, t)
    return jnp.minimum(s, gamma) / s


def p2_weight(schedule: NoiseSchedule, t: jax.Array, gamma: float = 1.0, k: float = 1.0) -> jax.Array:
    """P2 weighting (Choi et al. 2022) of the epsilon loss: 1 / (k + SNR) ** gamma."""
    return 1.0 / (k + snr(schedule, t)) ** gamma
