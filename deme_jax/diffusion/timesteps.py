"""Timestep intervals shared by training, DeMe, merging and analysis: which interval holds t, and
evenly spread timesteps.

A partition is a numpy int64 array of N + 1 strictly increasing boundaries
``[0, b1, ..., T]``; interval ``i`` holds the timesteps ``[boundaries[i],
boundaries[i + 1])``. The DeMe-specific partitions (explicit, log-SNR) live in
``deme_jax.deme.intervals``; the equal one is here because the training loop
reports its loss per equal interval too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_counts(num_timesteps: int, num_intervals: int) -> None:
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps={num_timesteps} must be >= 1")
    if num_intervals < 1:
        raise ValueError(f"num_intervals={num_intervals} must be >= 1")
    if num_intervals > num_timesteps:
        raise ValueError(
            f"num_intervals={num_intervals} > num_timesteps={num_timesteps}: some interval would be empty"
        )


def uniform_partition(num_timesteps: int, num_intervals: int) -> np.ndarray:
    """N intervals of equal width.

    When T is not a multiple of N the widths differ by at most one: the first
    ``T % N`` intervals (the smallest timesteps) get one extra timestep, as
    ``np.array_split`` does.
    """
    check_counts(num_timesteps, num_intervals)
    base, extra = divmod(num_timesteps, num_intervals)
    widths = np.full(num_intervals, base, np.int64)
    widths[:extra] += 1
    return np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)


def interval_index(t: jax.Array, boundaries) -> jax.Array:
    """The index of the interval of ``boundaries`` that holds each timestep (int32, the shape of ``t``)."""
    inner = jnp.asarray(np.asarray(boundaries)[1:-1], jnp.int32)
    return jnp.searchsorted(inner, t, side="right").astype(jnp.int32)


def interval_sums(values: jax.Array, t: jax.Array, boundaries) -> tuple[jax.Array, jax.Array]:
    """Sums and counts of per-example ``values`` in each interval of ``boundaries``."""
    index, n = interval_index(t, boundaries), len(boundaries) - 1
    return jax.ops.segment_sum(values, index, n), jax.ops.segment_sum(jnp.ones_like(values), index, n)


def interval_means(values: jax.Array, t: jax.Array, boundaries) -> jax.Array:
    """The mean of per-example ``values`` over the examples of each interval."""
    sums, counts = interval_sums(values, t, boundaries)
    return sums / counts


def interval_labels(boundaries) -> list[str]:
    """``["0-250", "250-500", ...]``: how metrics name the intervals."""
    return [f"{a}-{b}" for a, b in zip(boundaries[:-1], boundaries[1:])]


def spread_timesteps(n: int, num_timesteps: int) -> jax.Array:
    """``n`` int32 timesteps spread evenly over [0, T): losses comparable between models with far less noise
    than random timesteps give."""
    return ((jnp.arange(n) + 0.5) * num_timesteps / n).astype(jnp.int32)
