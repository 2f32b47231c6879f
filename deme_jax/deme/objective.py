"""DeMe's finetuning objective and the uncertainty-weighting baseline (ANT-UW)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deme_jax.diffusion import epsilon_loss
from deme_jax.diffusion.timesteps import interval_index, uniform_partition


def deme_loss(student_eps: jax.Array, teacher_eps: jax.Array, noise: jax.Array,
              consistency_weight: float = 1.0) -> jax.Array:
    """Per-example ``mse(noise, student) + lambda * mse(student, teacher)``.

    The teacher is the frozen pretrained model on the same noisy input; its
    output is a constant here, so only the student is pulled towards it.
    """
    teacher_eps = jax.lax.stop_gradient(teacher_eps)
    return epsilon_loss(student_eps, noise) + consistency_weight * epsilon_loss(student_eps, teacher_eps)


def uncertainty_weighted_loss(per_example: jax.Array, task: jax.Array, log_variances: jax.Array) -> jax.Array:
    """ANT-UW: Kendall et al.'s uncertainty weighting with one task per timestep interval.

    Each example's loss is scaled by ``exp(-s_k)`` and ``s_k`` is added, ``k``
    being its interval; the learnable ``s`` balances the intervals.
    """
    s = log_variances[task]
    return jnp.mean(jnp.exp(-s) * per_example + s)


def uncertainty_reduction(num_timesteps: int, num_tasks: int):
    """ANT-UW as a loss reduction: tasks are ``num_tasks`` equal timestep intervals, ``log_variances`` learnt."""

    boundaries = uniform_partition(num_timesteps, num_tasks)

    def reduce(per_example, t, loss_params):
        return uncertainty_weighted_loss(per_example, interval_index(t, boundaries), loss_params["log_variances"])

    return reduce
