"""Timestep partitions and the interval sampler against hand computations."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deme_jax.deme import (
    conflict_cuts,
    conflict_partition,
    explicit_partition,
    interval_timesteps,
    log_snr,
    log_snr_partition,
    make_partition,
    replica_timesteps,
    uniform_partition,
    within_similarity,
)
from deme_jax.diffusion import make_schedule

T = 1000
CHURCH = [0, 250, 500, 750, 1000]


def sample_batches(num_batches, batch_size, low, high, global_prob, seed=0):
    """(num_batches, batch_size) timesteps, one batch per rng."""
    keys = jax.random.split(jax.random.key(seed), num_batches)
    draw = jax.jit(jax.vmap(lambda k: interval_timesteps(k, batch_size, low, high, T, global_prob)))
    return np.asarray(draw(keys))


# Partitions


def test_uniform_partition_by_hand():
    np.testing.assert_array_equal(uniform_partition(1000, 4), CHURCH)
    # 10 = 3 + 3 + 2 + 2: the first T % N intervals take the extra timestep.
    np.testing.assert_array_equal(uniform_partition(10, 4), [0, 3, 6, 8, 10])
    np.testing.assert_array_equal(uniform_partition(7, 1), [0, 7])
    np.testing.assert_array_equal(uniform_partition(5, 5), np.arange(6))


def test_explicit_partition_accepts_boundaries_and_pairs():
    pairs = [[0, 250], [250, 500], [500, 750], [750, 1000]]
    np.testing.assert_array_equal(explicit_partition(T, CHURCH), CHURCH)
    np.testing.assert_array_equal(explicit_partition(T, pairs), CHURCH)
    np.testing.assert_array_equal(explicit_partition(T, [0, 100.0, 1000]), [0, 100, 1000])
    np.testing.assert_array_equal(make_partition(T, 4, boundaries=pairs), CHURCH)


@pytest.mark.parametrize("boundaries, match", [
    ([[0, 300], [250, 500], [500, 1000]], r"\[0, 300\) and \[250, 500\) overlap"),
    ([[0, 250], [300, 1000]], r"gap .*timesteps \[250, 300\) belong to no interval"),
    ([[10, 500], [500, 1000]], "must start at 0"),
    ([0, 500, 999], "must end at T=1000"),
    ([0, 500, 1001], "must end at T=1000"),
    ([0, 500, 500, 1000], r"\[500, 500\) is empty"),
    ([[0, 500], [500, 500], [500, 1000]], r"\[500, 500\) is empty"),
    ([0, 500, 250, 1000], r"\[500, 250\) is empty"),
    ([0, 250.5, 1000], "integer"),
    ([0], "at least 2"),
    ([], "empty"),
    ([[0, 1, 2]], "pairs"),
])
def test_explicit_partition_errors(boundaries, match):
    with pytest.raises(ValueError, match=match):
        explicit_partition(T, boundaries)


def test_explicit_partition_more_intervals_than_timesteps():
    with pytest.raises(ValueError, match="num_intervals=4 > num_timesteps=3"):
        explicit_partition(3, [0, 1, 2, 3, 3])


def test_log_snr_partition_splits_log_snr_evenly():
    abar = np.asarray(make_schedule().alphas_cumprod)
    lam = log_snr(abar)
    assert np.all(np.diff(lam) < 0)
    for n in (2, 4, 8):
        b = log_snr_partition(abar, n)
        assert b[0] == 0 and b[-1] == T and np.all(np.diff(b) >= 1)
        levels = lam[0] + (lam[-1] - lam[0]) * np.arange(n + 1) / n
        # Each interior boundary is the first timestep at or below its level.
        for k in range(1, n):
            assert lam[b[k]] <= levels[k] < lam[b[k] - 1]
        # Spans from one interval's first timestep to the next one's agree
        # with the equal share to within one timestep's step in log-SNR.
        starts = np.append(lam[b[:-1]], lam[-1])
        share = (lam[0] - lam[-1]) / n
        np.testing.assert_array_less(np.abs(-np.diff(starts) - share), np.abs(np.diff(lam)).max())
    # On the linear schedule the high-SNR interval is by far the narrowest:
    # widths 31, 272, 419, 278.
    np.testing.assert_array_equal(log_snr_partition(abar, 4), [0, 31, 303, 722, 1000])


def test_log_snr_partition_keeps_every_interval_non_empty():
    lam = np.array([10.0, 9.9, 9.8, 0.0, -5.0, -10.0])
    abar = 1 / (1 + np.exp(-lam))
    # Levels 5, 0, -5 count 3, 3, 4 timesteps above them; the second slice
    # is empty, so it borrows t = 3 and pushes the third boundary to 5.
    np.testing.assert_array_equal(log_snr_partition(abar, 4), [0, 3, 4, 5, 6])
    np.testing.assert_array_equal(log_snr_partition(abar, 6), np.arange(7))


def test_make_partition_rules():
    abar = np.asarray(make_schedule().alphas_cumprod)
    np.testing.assert_array_equal(make_partition(T, 4), CHURCH)
    np.testing.assert_array_equal(make_partition(T, 4, "log_snr", alphas_cumprod=abar), log_snr_partition(abar, 4))
    np.testing.assert_array_equal(make_partition(T, 2, "explicit", boundaries=[0, 100, 1000]), [0, 100, 1000])


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_intervals=0), "num_intervals=0 must be >= 1"),
    (dict(num_intervals=1001), "num_intervals=1001 > num_timesteps=1000"),
    (dict(rule="cosine"), "rule='cosine' is not supported"),
    (dict(rule="log_snr"), "needs alphas_cumprod"),
    (dict(rule="log_snr", alphas_cumprod=np.full(999, 0.5)), "999 entries"),
    (dict(rule="explicit"), "needs boundaries"),
    (dict(rule="conflict"), "needs boundaries .*conflict_partition"),
    (dict(rule="log_snr", boundaries=CHURCH), "not both"),
    (dict(num_intervals=3, boundaries=CHURCH), "define 4 intervals but num_intervals=3"),
])
def test_make_partition_errors(kwargs, match):
    kwargs = {"num_timesteps": T, "num_intervals": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_partition(**kwargs)


@pytest.mark.parametrize("abar, match", [
    (np.linspace(0.1, 0.9, 10), "non-increasing"),
    (np.linspace(1.0, 0.1, 10), "strictly between 0 and 1"),
    (np.ones((2, 5)) * 0.5, "1-D"),
])
def test_log_snr_partition_errors(abar, match):
    with pytest.raises(ValueError, match=match):
        log_snr_partition(abar, 2)


# Partitions from gradient conflict


def blocks_matrix(edges, inside=0.9, outside=0.1):
    """A similarity matrix with 1 on the diagonal, ``inside`` within each block of ``edges``, else ``outside``."""
    s = np.full((edges[-1],) * 2, outside)
    for a, b in zip(edges[:-1], edges[1:]):
        s[a:b, a:b] = inside
    np.fill_diagonal(s, 1.0)
    return s


def test_within_similarity_by_hand():
    s = np.array([[1.0, 0.5, -0.2], [0.5, 1.0, 0.1], [-0.2, 0.1, 1.0]])
    # bins {0, 1}: (1 + 0.5 + 0.5 + 1) / 2 = 1.5; bin {2}: 1; mean over the 3 bins: 2.5 / 3
    assert within_similarity(s, [0, 2, 3]) == pytest.approx(2.5 / 3)
    assert within_similarity(s, [0, 3]) == pytest.approx(s.sum() / 3 / 3)
    # no similarity between bins: every partition into N intervals scores N / K
    assert {round(within_similarity(np.eye(6), [0, *c, 6]), 12) for c in itertools.combinations(range(1, 6), 2)} == {
        0.5}


def test_conflict_partition_finds_the_blocks_of_alike_gradients():
    edges = [0, 3, 5, 11, 12]  # unequal blocks, one a single bin
    s = blocks_matrix(edges)
    np.testing.assert_array_equal(conflict_cuts(s, 4), edges)
    bins = uniform_partition(1200, 12)
    np.testing.assert_array_equal(conflict_partition(s, bins, 4), [0, 300, 500, 1100, 1200])
    # fewer intervals than blocks: the two most alike neighbours join (blocks 1 and 2 here)
    s[3:5, 5:11] = s[5:11, 3:5] = 0.8
    np.testing.assert_array_equal(conflict_cuts(s, 3), [0, 3, 11, 12])


@pytest.mark.parametrize("num_bins", [1, 2, 5, 7])
def test_conflict_partition_equals_brute_force(num_bins):
    rng = np.random.default_rng(num_bins)
    a = rng.uniform(-1, 1, (num_bins, num_bins))
    s = (a + a.T) / 2
    np.fill_diagonal(s, 1.0)
    for n in range(1, num_bins + 1):
        every = [[0, *c, num_bins] for c in itertools.combinations(range(1, num_bins), n - 1)]
        best = max(within_similarity(s, cuts) for cuts in every)
        cuts = conflict_cuts(s, n)
        assert len(cuts) == n + 1 and cuts[0] == 0 and cuts[-1] == num_bins and np.all(np.diff(cuts) > 0)
        assert within_similarity(s, cuts) == pytest.approx(best, abs=1e-12)


def test_conflict_partition_errors_name_the_problem_and_the_fix():
    with pytest.raises(ValueError, match=r"K=3 bins cannot make N=4 intervals.*conflict_bins >= num_replicas"):
        conflict_cuts(np.eye(3), 4)
    with pytest.raises(ValueError, match=r"similarity matrix of shape \(3, 4\): give the \(K, K\) cosine matrix"):
        conflict_cuts(np.ones((3, 4)), 2)
    with pytest.raises(ValueError, match=r"shape \(3, 3\) for 4 bins: give the cosine matrix of these bins"):
        conflict_partition(np.eye(3), [0, 250, 500, 750, 1000], 2)


# Sampler


def test_interval_only_when_global_prob_is_zero():
    t = sample_batches(500, 8, 250, 500, 0.0)
    assert t.dtype == np.int32 and t.shape == (500, 8)
    assert t.min() >= 250 and t.max() < 500
    assert t.min() == 250 and t.max() == 499  # both ends are reachable


def test_global_only_when_global_prob_is_one():
    t = sample_batches(500, 8, 250, 500, 1.0)
    assert t.min() >= 0 and t.max() < T
    assert np.mean((t < 250) | (t >= 500)) > 0.6  # about 3/4 fall outside [250, 500)


def test_global_frequency():
    # A one-timestep interval: an interval batch is all 500, a global batch
    # practically never is (5 independent draws).
    num, p = 4000, 0.3
    t = sample_batches(num, 8, 500, 501, p)
    global_batches = np.sum(np.any(t != 500, axis=1))
    assert abs(global_batches - num * p) < 5 * np.sqrt(num * p * (1 - p))


@pytest.mark.parametrize("batch_size", [8, 7, 1, 2])
@pytest.mark.parametrize("global_prob, mirror_sum", [(0.0, 250 + 500 - 1), (1.0, T - 1)])
def test_antithetic_pairs(batch_size, global_prob, mirror_sum):
    t = sample_batches(50, batch_size, 250, 500, global_prob)
    half = batch_size // 2 + 1
    # Row i (i < B - half) is mirrored by row i + half; the first `half` rows are free draws.
    np.testing.assert_array_equal(t[:, : batch_size - half] + t[:, half:], mirror_sum)


def test_vmap_over_replicas_gives_each_its_interval():
    b = jnp.asarray(CHURCH)
    keys = jax.random.split(jax.random.key(1), 4)
    direct = jax.vmap(lambda k, lo, hi: interval_timesteps(k, 16, lo, hi, T, 0.0))(keys, b[:-1], b[1:])
    t = np.asarray(jax.jit(replica_timesteps, static_argnums=1)(jax.random.key(1), 16, CHURCH, 0.0))
    np.testing.assert_array_equal(t, direct)
    assert t.shape == (4, 16)
    for i in range(4):
        assert np.all((t[i] >= CHURCH[i]) & (t[i] < CHURCH[i + 1]))
    # The replicas draw from their own rngs: no two share the same offsets.
    offsets = t - np.asarray(CHURCH[:-1])[:, None]
    assert len({tuple(o) for o in offsets}) == 4


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_bad_global_prob(p):
    with pytest.raises(ValueError, match=r"global_prob \(p\)"):
        interval_timesteps(jax.random.key(0), 8, 0, 250, T, p)


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size=0"):
        interval_timesteps(jax.random.key(0), 0, 0, 250, T, 0.3)
