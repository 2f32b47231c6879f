"""DeMe's partitions of [0, T) into N replicas' intervals (equal, explicit, log-SNR, from gradient conflict) and the
interval sampler.

Partitions are boundary arrays as in ``deme_jax.diffusion.timesteps`` (which
holds the equal partition and ``interval_index``); replica ``i`` owns the
timesteps ``[boundaries[i], boundaries[i + 1])``, so replicas are ordered from
small t (fine detail) to large t (coarse content).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deme_jax.diffusion.timesteps import check_counts, uniform_partition

PARTITION_RULES = ("uniform", "log_snr", "explicit", "conflict")


def _format_interval(low, high) -> str:
    return f"[{low}, {high})"


def explicit_partition(num_timesteps: int, boundaries: Sequence) -> np.ndarray:
    """Validates a user's partition and returns it as N + 1 boundaries.

    ``boundaries`` is either the N + 1 boundaries ``[0, b1, ..., T]`` or N
    ``[low, high)`` pairs listed from small to large t. The intervals must be
    non-empty, must not overlap, must leave no timestep out and must cover
    exactly [0, T).
    """
    values = np.asarray(boundaries)
    if values.size == 0:
        raise ValueError("boundaries is empty: give N + 1 boundaries from 0 to T or N [low, high) pairs")
    if not np.issubdtype(values.dtype, np.integer):
        if not (np.issubdtype(values.dtype, np.number) and np.all(values == np.round(values))):
            raise ValueError(f"boundaries must be integer timesteps, got {boundaries!r}")
        values = values.astype(np.int64)
    T = num_timesteps
    if values.ndim == 1:
        if len(values) < 2:
            raise ValueError(f"boundaries={values.tolist()} needs at least 2 entries (0 and T={T})")
        lows, highs = values[:-1], values[1:]
    elif values.ndim == 2 and values.shape[1] == 2:
        lows, highs = values[:, 0], values[:, 1]
    else:
        raise ValueError(
            f"boundaries of shape {values.shape}: give N + 1 boundaries or N [low, high) pairs"
        )
    check_counts(T, len(lows))
    for low, high in zip(lows, highs):
        if high <= low:
            raise ValueError(
                f"interval {_format_interval(low, high)} is empty: each interval's low must be below its high"
            )
    if lows[0] != 0:
        raise ValueError(f"the partition must start at 0, but the first interval starts at {lows[0]}")
    if highs[-1] != T:
        raise ValueError(f"the partition must end at T={T}, but the last interval ends at {highs[-1]}")
    for i in range(1, len(lows)):
        prev, cur = _format_interval(lows[i - 1], highs[i - 1]), _format_interval(lows[i], highs[i])
        if lows[i] < highs[i - 1]:
            raise ValueError(f"intervals {prev} and {cur} overlap (or are listed out of order)")
        if lows[i] > highs[i - 1]:
            raise ValueError(
                f"gap between {prev} and {cur}: timesteps {_format_interval(highs[i - 1], lows[i])} "
                "belong to no interval"
            )
    return np.concatenate([lows, highs[-1:]]).astype(np.int64)


def log_snr(alphas_cumprod) -> np.ndarray:
    """log(abar / (1 - abar)) in float64, monotone decreasing in t."""
    abar = np.asarray(alphas_cumprod, np.float64)
    return np.log(abar) - np.log1p(-abar)


def log_snr_partition(alphas_cumprod, num_intervals: int) -> np.ndarray:
    """N intervals that each span an equal range of log-SNR.

    The linear schedule spends most of its timesteps at low SNR, where the
    content is coarse; slicing log-SNR, not t, into equal ranges gives the
    high-SNR, fine-detail regime more, narrower intervals. The range
    [lambda(T - 1), lambda(0)] is cut into N equal slices and interval k holds
    the timesteps whose log-SNR falls in slice k (the upper end closed), so
    each interval's log-SNR span matches the others' to within one
    timestep's step in log-SNR. A slice that holds no timestep (many
    intervals, a steep schedule) borrows one from its neighbour, so every
    interval is non-empty.
    """
    abar = np.asarray(alphas_cumprod, np.float64)
    if abar.ndim != 1:
        raise ValueError(f"alphas_cumprod must be 1-D, got shape {abar.shape}")
    T = len(abar)
    check_counts(T, num_intervals)
    if not np.all((abar > 0) & (abar < 1)):
        raise ValueError("alphas_cumprod must lie strictly between 0 and 1 for log-SNR to be finite")
    lam = log_snr(abar)
    if np.any(np.diff(lam) > 0):
        raise ValueError("alphas_cumprod must be non-increasing in t")
    levels = lam[0] + (lam[-1] - lam[0]) * np.arange(1, num_intervals) / num_intervals
    inner = [int(np.sum(lam > level)) for level in levels]
    bounds = np.array([0, *inner, T], np.int64)
    for k in range(1, num_intervals):
        bounds[k] = max(bounds[k], bounds[k - 1] + 1)
    for k in range(num_intervals - 1, 0, -1):
        bounds[k] = min(bounds[k], bounds[k + 1] - 1)
    return bounds


def within_similarity(similarity, cuts) -> float:
    """How alike the gradients inside the intervals are: the mean over the K bins of each bin's mean cosine
    similarity to the bins of its interval (itself included).

    ``cuts`` are N + 1 bin indices ``[0, c1, ..., K]``. Each bin counts once, so
    without any similarity between bins (the identity matrix) every partition
    scores N / K: the measure rewards grouping alike bins, not small intervals.
    """
    s = np.asarray(similarity, np.float64)
    return float(sum(s[a:b, a:b].sum() / (b - a) for a, b in zip(cuts[:-1], cuts[1:])) / len(s))


def conflict_cuts(similarity, num_intervals: int) -> np.ndarray:
    """The N + 1 bin indices of the contiguous partition of K bins that maximises ``within_similarity``.

    Exact dynamic programming over (intervals so far, bins covered): O(N K^2).
    """
    s = np.asarray(similarity, np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"similarity matrix of shape {s.shape}: give the (K, K) cosine matrix of the K bins' "
                         "gradients")
    K = len(s)
    if not 1 <= num_intervals <= K:
        raise ValueError(f"K={K} bins cannot make N={num_intervals} intervals: intervals are unions of whole bins, "
                         "so use at least as many bins as intervals (config.deme.conflict_bins >= num_replicas)")
    corner = np.zeros((K + 1, K + 1))
    corner[1:, 1:] = s.cumsum(0).cumsum(1)
    a, b = np.meshgrid(np.arange(K + 1), np.arange(K + 1), indexing="ij")
    with np.errstate(divide="ignore", invalid="ignore"):  # value[a, b]: interval of bins [a, b), a < b only
        value = np.where(a < b, (corner[b, b] - corner[a, b] - corner[b, a] + corner[a, a]) / (b - a), -np.inf)
    best = np.full((num_intervals + 1, K + 1), -np.inf)
    best[0, 0] = 0.0
    start = np.zeros((num_intervals + 1, K + 1), np.int64)
    for n in range(1, num_intervals + 1):
        total = best[n - 1][:, None] + value  # [a, b]: n - 1 intervals up to a, then [a, b)
        start[n], best[n] = total.argmax(0), total.max(0)
    cuts = [K]
    for n in range(num_intervals, 0, -1):
        cuts.append(int(start[n, cuts[-1]]))
    return np.asarray(cuts[::-1], np.int64)


def conflict_partition(similarity, bins, num_intervals: int) -> np.ndarray:
    """N intervals, each a run of the fine ``bins`` (K + 1 boundaries), whose gradients are most alike
    (``conflict_cuts`` on the bins' cosine ``similarity``)."""
    bins = np.asarray(bins)
    shape = np.shape(similarity)
    if shape != (len(bins) - 1,) * 2:
        raise ValueError(f"similarity matrix of shape {shape} for {len(bins) - 1} bins: give the cosine matrix of "
                         "these bins' gradients, one row and column per bin")
    return bins[conflict_cuts(similarity, num_intervals)].astype(np.int64)


def make_partition(num_timesteps: int, num_intervals: int, rule: str = "uniform", boundaries=None,
                   alphas_cumprod=None) -> np.ndarray:
    """The partition a config asks for: ``boundaries`` when given, else ``rule``.

    ``conflict`` needs its boundaries: they come from the pretrained model's
    gradients (``conflict_partition``), which `deme finetune` measures once.
    """
    if rule not in PARTITION_RULES:
        raise ValueError(
            f"rule={rule!r} is not supported; supported values: " + ", ".join(map(repr, PARTITION_RULES))
        )
    check_counts(num_timesteps, num_intervals)
    if boundaries is not None or rule in ("explicit", "conflict"):
        if boundaries is None:
            how = " (conflict_partition chooses them from the bins' gradient similarity)" if rule == "conflict" else ""
            raise ValueError(f"rule={rule!r} needs boundaries{how}")
        if rule == "log_snr":
            raise ValueError("give either boundaries or rule='log_snr', not both")
        partition = explicit_partition(num_timesteps, boundaries)
        if len(partition) - 1 != num_intervals:
            raise ValueError(
                f"boundaries define {len(partition) - 1} intervals but num_intervals={num_intervals}"
            )
        return partition
    if rule == "log_snr":
        if alphas_cumprod is None:
            raise ValueError("rule='log_snr' needs alphas_cumprod")
        if len(alphas_cumprod) != num_timesteps:
            raise ValueError(
                f"alphas_cumprod has {len(alphas_cumprod)} entries but num_timesteps={num_timesteps}"
            )
        return log_snr_partition(alphas_cumprod, num_intervals)
    return uniform_partition(num_timesteps, num_intervals)


def check_global_prob(global_prob) -> None:
    """Raises unless the global sampling probability p lies in [0, 1]; call it outside jit."""
    if not 0.0 <= float(global_prob) <= 1.0:
        raise ValueError(f"global_prob (p) = {global_prob} must lie in [0, 1]")


def interval_timesteps(rng: jax.Array, batch_size: int, low, high, num_timesteps, global_prob) -> jax.Array:
    """Antithetic int32 timesteps of shape (B,) for one replica's batch.

    With probability ``global_prob`` the whole batch draws from [0, T), which
    keeps the replica from forgetting the other intervals; otherwise from its
    own [low, high). ``B // 2 + 1`` timesteps t are drawn uniformly and followed
    by their mirrors ``low + high - 1 - t`` (``T - 1 - t`` globally), and the
    first B are kept, so the batch covers both ends of the range evenly.

    ``low``, ``high`` and ``global_prob`` may be traced: vmap over stacked
    bounds and per-replica rngs to sample all replicas at once.
    ``batch_size`` is static.
    """
    if isinstance(global_prob, (int, float)):
        check_global_prob(global_prob)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    rng_global, rng_t = jax.random.split(rng)
    use_global = jax.random.uniform(rng_global) < global_prob
    lo = jnp.where(use_global, 0, low).astype(jnp.int32)
    hi = jnp.where(use_global, num_timesteps, high).astype(jnp.int32)
    t = jax.random.randint(rng_t, (batch_size // 2 + 1,), lo, hi, jnp.int32)
    return jnp.concatenate([t, lo + hi - 1 - t])[:batch_size]


def replica_timesteps(rng: jax.Array, batch_size: int, boundaries, global_prob) -> jax.Array:
    """int32 timesteps of shape (N, B): replica i samples its own interval with its own rng."""
    boundaries = jnp.asarray(boundaries, jnp.int32)
    rngs = jax.random.split(rng, len(boundaries) - 1)
    sample = lambda r, low, high: interval_timesteps(r, batch_size, low, high, boundaries[-1], global_prob)
    return jax.vmap(sample)(rngs, boundaries[:-1], boundaries[1:])
