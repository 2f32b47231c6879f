"""Task vectors, task arithmetic (per replica and per block), TIES and DARE on small trees, against hand
computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deme_jax.merge import merge, task_vectors, weight_groups

leaves = jax.tree_util.tree_leaves


def tree(a, b, step=0):
    """A two-leaf parameter tree (nested, so key paths have depth) plus an integer counter."""
    return {"conv": {"kernel": jnp.asarray(a, jnp.float32)}, "norm": jnp.asarray(b, jnp.float32),
            "step": jnp.asarray(step, jnp.int32)}


def stack(trees):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def assert_tree_equal(x, y):
    assert jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(y)
    for a, b in zip(leaves(x), leaves(y)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


BASE = tree([1.0, 2.0, 3.0], [0.0, -1.0])
REPLICAS = [tree([2.0, 2.0, 3.0], [0.0, -1.0], 7),
            tree([1.0, 4.0, 3.0], [1.0, -1.0], 7),
            tree([1.0, 2.0, 0.0], [0.0, 1.0], 7),
            tree([5.0, 2.0, 3.0], [0.0, -3.0], 7)]
# tau_i = theta_i - theta, by hand
TAUS = [tree([1.0, 0.0, 0.0], [0.0, 0.0]),
        tree([0.0, 2.0, 0.0], [1.0, 0.0]),
        tree([0.0, 0.0, -3.0], [0.0, 2.0]),
        tree([4.0, 0.0, 0.0], [0.0, -2.0])]


def test_task_vectors_list_and_stacked():
    taus = task_vectors(BASE, REPLICAS)
    assert isinstance(taus, list) and len(taus) == 4
    for got, want in zip(taus, TAUS):
        assert_tree_equal(got, want)  # the counter's task vector is zero
    assert_tree_equal(task_vectors(BASE, stack(REPLICAS)), stack(TAUS))
    assert isinstance(task_vectors(BASE, tuple(REPLICAS)), list)


def test_task_arithmetic_weights_need_not_sum_to_one():
    merged = merge(BASE, REPLICAS, [0.1, 0.1, 0.2, 0.5])
    # kernel: [1 + 0.1*1 + 0.5*4, 2 + 0.1*2, 3 + 0.2*(-3)]; norm: [0 + 0.1*1, -1 + 0.2*2 + 0.5*(-2)]
    want = tree([3.1, 2.2, 2.4], [0.1, -1.6])
    for a, b in zip(leaves(merged), leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert int(merged["step"]) == 0  # non-float leaves keep base's value


def test_block_weights_scale_each_top_level_entry_by_hand():
    assert weight_groups(BASE) == ("conv", "norm", "step")
    weights = [[1.0, 0.0, 9.0], [0.5, 2.0, 9.0], [0.0, 1.0, 9.0], [0.25, -1.0, 9.0]]  # columns: conv, norm, step
    merged = merge(BASE, REPLICAS, weights)
    # kernel: [1 + 1*1 + 0.25*4, 2 + 0.5*2, 3]; norm: [0 + 2*1, -1 + 1*2 - 1*(-2)]; step stays the base's
    np.testing.assert_allclose(merged["conv"]["kernel"], [3.0, 3.0, 3.0])
    np.testing.assert_allclose(merged["norm"], [2.0, 3.0])
    assert int(merged["step"]) == 0


METHODS = [
    ("task_arithmetic", {}),
    ("ties", {"density": 0.5, "scale": 0.7}),
    ("dare", {"drop_rate": 0.5, "rng": jax.random.key(3)}),
]


@pytest.mark.parametrize("method, options", METHODS)
def test_tied_block_weights_are_the_per_replica_merge(method, options):
    weights = jnp.array([0.1, 0.1, 0.2, 0.5])
    tied = jnp.repeat(weights[:, None], len(weight_groups(BASE)), axis=1)
    assert_tree_equal(merge(BASE, REPLICAS, tied, method, **options), merge(BASE, REPLICAS, weights, method, **options))


@pytest.mark.parametrize("method, options", METHODS)
def test_list_and_stacked_agree(method, options):
    weights = jnp.array([0.1, 0.1, 0.2, 0.5])
    assert_tree_equal(merge(BASE, REPLICAS, weights, method, **options),
                      merge(BASE, stack(REPLICAS), weights, method, **options))


def test_identical_replicas_with_weights_summing_to_one_come_back():
    rng = np.random.default_rng(0)
    base = tree(rng.standard_normal((3, 4)), rng.standard_normal(5))
    theta = tree(rng.standard_normal((3, 4)), rng.standard_normal(5), step=3)
    merged = merge(base, [theta] * 4, [0.1, 0.1, 0.3, 0.5])
    # Equal up to float32 rounding of (theta - base) and the weighted sum, not bit for bit.
    for a, b in zip(leaves(merged), leaves({**theta, "step": base["step"]})):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_merge_keeps_structure_shapes_and_dtypes():
    base = {"w": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.zeros(3, jnp.float16), "mask": jnp.array([True, False])}
    ft = {"w": jnp.full((2, 3), 1.5, jnp.bfloat16), "b": jnp.full(3, 0.25, jnp.float16),
          "mask": jnp.array([False, False])}
    dare = {"drop_rate": 0.1, "rng": jax.random.key(0)}
    for method, options in [("task_arithmetic", {}), ("ties", {}), ("dare", dare)]:
        merged = merge(base, [ft, ft], [0.5, 0.5], method, **options)
        assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
        for m, b in zip(leaves(merged), leaves(base)):
            assert m.shape == b.shape and m.dtype == b.dtype
        np.testing.assert_array_equal(merged["mask"], base["mask"])
    np.testing.assert_array_equal(merge(base, [ft, ft], [0.5, 0.5])["w"].astype(np.float32), 1.5)


def test_jitted_merge_compiles_once_for_many_weights():
    traces = []

    @jax.jit
    def merged_kernel(weights):
        traces.append(1)
        return merge(BASE, stack(REPLICAS), weights)["conv"]["kernel"]

    for w in ([0.1, 0.1, 0.2, 0.5], [1.0, 0.0, 0.0, 0.0], [0.25] * 4):
        want = merge(BASE, REPLICAS, w)["conv"]["kernel"]
        np.testing.assert_allclose(merged_kernel(jnp.array(w)), want, rtol=1e-6)
    assert len(traces) == 1


# TIES, by hand. Base is zero, so the finetuned trees are the task vectors;
# the kernel has 4 entries and the norm 2, P = 6, density 0.5 keeps k = 3 per
# vector over the whole model:
#   tau1 = [3, -1, 0.5, 2 | -4, 0.1]   -> keeps 4, 3, 2:  [3, 0, 0, 2 | -4, 0]
#   tau2 = [-2, 1, 0.2, -3 | 1, 5]     -> keeps 5, 3, 2:  [-2, 0, 0, -3 | 0, 5]
#   tau3 = [1, 2, -6, 0.3 | 0.2, -0.4] -> keeps 6, 2, 1:  [1, 2, -6, 0 | 0, 0]
# (trimming each leaf alone would keep tau3's -0.4 instead of its 1).
TIES_BASE = {"kernel": jnp.zeros(4), "norm": jnp.zeros(2)}
TIES_TAUS = [{"kernel": jnp.array([3.0, -1.0, 0.5, 2.0]), "norm": jnp.array([-4.0, 0.1])},
             {"kernel": jnp.array([-2.0, 1.0, 0.2, -3.0]), "norm": jnp.array([1.0, 5.0])},
             {"kernel": jnp.array([1.0, 2.0, -6.0, 0.3]), "norm": jnp.array([0.2, -0.4])}]


def test_ties_by_hand():
    # Sums of trimmed vectors [2, 2, -6, -1 | -4, 5] elect signs [+, +, -, - | -, +];
    # means over the agreeing non-zero entries:
    #   [mean(3, 1), 2, -6, -3 | -4, 5] = [2, 2, -6, -3 | -4, 5]
    merged = merge(TIES_BASE, TIES_TAUS, [1.0, 1.0, 1.0], "ties", density=0.5, scale=0.5)
    np.testing.assert_allclose(merged["kernel"], 0.5 * np.array([2.0, 2.0, -6.0, -3.0]))
    np.testing.assert_allclose(merged["norm"], 0.5 * np.array([-4.0, 5.0]))


def test_ties_weights_scale_trimmed_vectors_before_the_election():
    # Weights [1, 3, 1] make tau2's trimmed entries [-6, 0, 0, -9 | 0, 15]:
    # sums [-2, 2, -6, -7 | -4, 15] elect [-, +, -, - | -, +], and the first
    # entry now takes tau2's -6 alone.
    merged = merge(TIES_BASE, TIES_TAUS, [1.0, 3.0, 1.0], "ties", density=0.5)
    np.testing.assert_allclose(merged["kernel"], [-6.0, 2.0, -6.0, -9.0])
    np.testing.assert_allclose(merged["norm"], [-4.0, 15.0])


def test_ties_zero_sum_takes_the_majority_sign():
    base = {"w": jnp.zeros(3)}
    # Sums [0, 2, 0]: signs [0, +, 0], the model-wide majority is +, so the
    # first entry keeps only the positive 2.
    merged = merge(base, [{"w": jnp.array([2.0, 1.0, 0.0])}, {"w": jnp.array([-2.0, 1.0, 0.0])}],
                   [1.0, 1.0], "ties", density=1.0)
    np.testing.assert_allclose(merged["w"], [2.0, 1.0, 0.0])


# DARE


def dare_setup():
    rng = np.random.default_rng(1)
    normal = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    base = {"a": normal((4, 4)), "b": normal(3)}
    fts = [jax.tree_util.tree_map(lambda x: x + normal(x.shape), base) for _ in range(2)]
    return base, fts


def test_dare_without_drops_is_task_arithmetic():
    base, fts = dare_setup()
    assert_tree_equal(merge(base, fts, [0.3, 0.9], "dare", drop_rate=0.0, rng=jax.random.key(0)),
                      merge(base, fts, [0.3, 0.9]))


def test_dare_dropped_entries_are_exactly_zero():
    base, fts = dare_setup()
    p = 0.6
    merged = merge(base, fts[:1], [1.0], "dare", drop_rate=p, rng=jax.random.key(5))
    tau = task_vectors(base, fts[:1])[0]
    dropped = kept = 0
    for m, b, t in zip(leaves(merged), leaves(base), leaves(tau)):
        delta, t = np.asarray(m) - np.asarray(b), np.asarray(t)
        drop = np.asarray(m) == np.asarray(b)
        np.testing.assert_allclose(delta[~drop], t[~drop] / (1 - p), rtol=1e-5, atol=1e-6)
        dropped, kept = dropped + drop.sum(), kept + (~drop).sum()
    assert 0 < dropped and 0 < kept  # 19 entries at p = 0.6: about 11 dropped


def test_dare_expectation_is_task_arithmetic():
    base, fts = dare_setup()
    p, weights, num = 0.5, jnp.array([0.3, 0.9]), 4000
    keys = jax.random.split(jax.random.key(7), num)
    samples = jax.jit(jax.vmap(lambda k: merge(base, fts, weights, "dare", drop_rate=p, rng=k)))(keys)
    expected = merge(base, fts, weights)
    taus = task_vectors(base, stack(fts))
    for s, e, t in zip(leaves(samples), leaves(expected), leaves(taus)):
        # Each entry of w_i tau_i / (1 - p) * Bernoulli(1 - p) has variance w_i^2 tau_i^2 p / (1 - p).
        sd = np.sqrt(np.tensordot(np.asarray(weights) ** 2, np.asarray(t) ** 2, axes=1) * p / (1 - p) / num)
        assert np.all(np.abs(np.asarray(s).mean(0) - np.asarray(e)) < 5 * sd + 1e-6)


# Errors


@pytest.mark.parametrize("finetuned, weights, match", [
    (REPLICAS, [0.5, 0.5, 0.5], "got 3 weights for 4 finetuned models"),
    (REPLICAS, [[0.5] * 4], "weights of shape"),
    (REPLICAS, [[0.5] * 2] * 4, r"weights of shape \(4, 2\): .* shape \(4,\), or one per model and top-level "
                                r"entry of the tree, shape \(4, 3\)"),
    ([], [], "finetuned is empty"),
    ([{"conv": {"kernel": jnp.zeros(3)}, "norm": jnp.zeros(2)}], [1.0],
     r"finetuned\[0\] lacks the leaf at key path \['step'\]"),
    ([REPLICAS[0], {**REPLICAS[0], "extra": jnp.zeros(1)}], [1.0, 1.0],
     r"finetuned\[1\] has a leaf at key path \['extra'\]"),
    ([{**REPLICAS[0], "conv": {"kernel": jnp.zeros(4)}}], [1.0],
     r"finetuned\[0\]\['conv'\]\['kernel'\] has shape \(4,\) .* expected shape \(3,\)"),
    ([{**REPLICAS[0], "norm": jnp.zeros(2, jnp.float16)}], [1.0],
     r"finetuned\[0\]\['norm'\] has shape \(2,\) and dtype float16, expected shape \(2,\) and dtype float32"),
    ({**stack(REPLICAS), "norm": jnp.zeros((3, 2))}, [1.0] * 4,
     r"finetuned \(stacked\)\['norm'\] has shape \(3, 2\) .* expected shape \(4, 2\)"),
    ({**stack(REPLICAS), "step": jnp.int32(0)}, [1.0] * 4, r"\['step'\] is a scalar"),
])
def test_merge_errors(finetuned, weights, match):
    with pytest.raises(ValueError, match=match):
        merge(BASE, finetuned, weights)


@pytest.mark.parametrize("method, options, match", [
    ("average", {}, "method='average' is not supported"),
    ("task_arithmetic", {"density": 0.2}, r"not \['density'\]"),
    ("ties", {"density": 0.0}, r"density=0.0 must lie in \(0, 1\]"),
    ("dare", {"rng": jax.random.key(0)}, "needs drop_rate"),
    ("dare", {"drop_rate": 0.5}, "needs rng"),
    ("dare", {"drop_rate": 1.0, "rng": jax.random.key(0)}, r"drop_rate=1.0 must lie in \[0, 1\)"),
])
def test_method_errors(method, options, match):
    with pytest.raises(ValueError, match=match):
        merge(BASE, REPLICAS, [0.25] * 4, method, **options)


def test_task_vectors_errors():
    with pytest.raises(ValueError, match="finetuned is empty"):
        task_vectors(BASE, [])
    with pytest.raises(ValueError, match=r"finetuned\[0\] lacks the leaf at key path \['norm'\]"):
        task_vectors(BASE, [{"conv": REPLICAS[0]["conv"], "step": REPLICAS[0]["step"]}])
