"""Task vectors and model merging over parameter pytrees.

A task vector is ``tau_i = theta_i - theta``: what finetuning replica ``i``
changed in the base parameters ``theta``. Merging adds a weighted combination
of task vectors back to ``theta``, giving one model of the base's size.

Replicas come either as a list (or tuple) of trees shaped like the base, or as
one stacked tree whose every leaf has a leading replica axis of size N; a
Python list or tuple is always read as replicas.

Only floating-point leaves are parameters a task moves. Other leaves (integer
counters, boolean masks) must still match the base's shape and dtype, their
task vector is zero and a merge keeps the base's value.

Weights are one per replica (shape (N,)), or one per replica and top-level
entry of the tree (shape (N, G), the entries in ``weight_groups`` order: for a
UNet its blocks, time embedding and input and output layers), so that each
block can take its own share of each task vector.

Everything is ``jax.tree_util`` maps over leaves, so ``merge`` can be jitted
with ``method`` static; the weights are read as one array, so a jitted merge
does not recompile for a new weight vector, and it is differentiable in them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

METHODS = ("task_arithmetic", "ties", "dare")


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _compute_dtype(x):
    """The leaf's dtype, widened to at least float32 for the arithmetic."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _describe(x) -> str:
    return f"shape {tuple(jnp.shape(x))} and dtype {jnp.result_type(x)}"


def _check_structure(base, tree, name: str, stacked: bool):
    """Raises naming the first key path where ``tree`` differs from ``base``; returns N when stacked."""
    base_leaves = jax.tree_util.tree_flatten_with_path(base)[0]
    tree_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    base_paths = [jax.tree_util.keystr(p) for p, _ in base_leaves]
    tree_paths = [jax.tree_util.keystr(p) for p, _ in tree_leaves]
    for i, (bp, tp) in enumerate(zip(base_paths + [None], tree_paths + [None])):
        if bp != tp:
            if tp is None or (bp is not None and bp not in tree_paths):
                raise ValueError(f"{name} lacks the leaf at key path {bp} that base has")
            raise ValueError(f"{name} has a leaf at key path {tp} that base does not have")
        if bp is None:
            break
    if jax.tree_util.tree_structure(base) != jax.tree_util.tree_structure(tree):
        raise ValueError(f"{name} has the same key paths as base but other node types")
    num = None
    for path, (_, b), (_, x) in zip(base_paths, base_leaves, tree_leaves):
        expected = tuple(jnp.shape(b))
        if stacked:
            if jnp.ndim(x) == 0:
                raise ValueError(f"{name}{path} is a scalar: every stacked leaf needs a leading replica axis")
            num = jnp.shape(x)[0] if num is None else num
            expected = (num,) + expected
        if tuple(jnp.shape(x)) != expected or jnp.result_type(x) != jnp.result_type(b):
            raise ValueError(f"{name}{path} has {_describe(x)}, expected shape {expected} "
                             f"and dtype {jnp.result_type(b)}"
                             + (" (the same leading replica axis on every leaf)" if stacked else ""))
    return num


def _stack(base, finetuned):
    """(stacked replicas, N, whether they came as a list), after checking them against base."""
    if isinstance(finetuned, (list, tuple)):
        if not finetuned:
            raise ValueError("finetuned is empty: give at least one finetuned tree")
        for i, tree in enumerate(finetuned):
            _check_structure(base, tree, f"finetuned[{i}]", stacked=False)
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *finetuned)
        return stacked, len(finetuned), True
    num = _check_structure(base, finetuned, "finetuned (stacked)", stacked=True)
    if num is None:
        raise ValueError("finetuned (stacked) has no leaves to stack")
    if num == 0:
        raise ValueError("finetuned (stacked) is empty: its replica axis has size 0")
    return finetuned, num, False


def _stacked_task_vectors(base, stacked):
    """Task vectors with a leading replica axis, in each leaf's compute dtype (zeros for non-float leaves)."""
    def leaf(b, x):
        if not _is_float(b):
            return jnp.zeros(jnp.shape(x), jnp.result_type(x))
        dtype = _compute_dtype(b)
        return jnp.asarray(x, dtype) - jnp.asarray(b, dtype)[None]
    return jax.tree_util.tree_map(leaf, base, stacked)


def task_vectors(base, finetuned):
    """``tau_i = theta_i - theta`` per replica, in the form given: a list in gives a list out.

    Each task vector has the base's structure and dtypes; non-float leaves are zero.
    """
    stacked, num, as_list = _stack(base, finetuned)
    taus = jax.tree_util.tree_map(
        lambda b, x, t: t.astype(jnp.result_type(x)), base, stacked, _stacked_task_vectors(base, stacked))
    if as_list:
        return [jax.tree_util.tree_map(lambda t, i=i: t[i], taus) for i in range(num)]
    return taus


def _apply(base, delta):
    """``theta + delta`` in the compute dtype, cast back to base's dtypes; non-float leaves stay base's."""
    def leaf(b, d):
        if not _is_float(b):
            return b
        dtype = _compute_dtype(b)
        return (jnp.asarray(b, dtype) + d).astype(jnp.result_type(b))
    return jax.tree_util.tree_map(leaf, base, delta)


def _entry_name(key) -> str:
    return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))


def _leaf_entries(tree) -> list[str]:
    """The top-level entry that holds each leaf, in leaf order."""
    return [_entry_name(path[0]) if path else "" for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def weight_groups(base) -> tuple[str, ...]:
    """The names of base's top-level entries, in order: the columns of (N, G) merge weights."""
    return tuple(dict.fromkeys(_leaf_entries(base)))


def _leaf_weights(base, weights):
    """A tree shaped like base whose every leaf is that leaf's (N,) weights."""
    if weights.ndim == 1:
        return jax.tree_util.tree_map(lambda _: weights, base)
    column = {name: g for g, name in enumerate(weight_groups(base))}
    treedef = jax.tree_util.tree_structure(base)
    return jax.tree_util.tree_unflatten(treedef, [weights[:, column[name]] for name in _leaf_entries(base)])


def _weighted_sum(taus, leaf_weights):
    """``sum_i w_i tau_i`` over the replica axis, leaf by leaf."""
    return jax.tree_util.tree_map(lambda t, w: jnp.tensordot(w.astype(t.dtype), t, axes=1), taus, leaf_weights)


def _float_leaves(base, tree):
    return [t for b, t in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(tree)) if _is_float(b)]


def _ties(base, taus, leaf_weights, density, scale):
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

    Trim: each task vector keeps its ``k = ceil(density * P)`` entries of
    largest magnitude over the whole model (P float parameters), entries tied
    with the k-th included, and zeroes the rest. The weights then scale each
    trimmed vector, so they take part in the sign election and the mean.
    Elect: each parameter takes the sign of the sum of the weighted, trimmed
    vectors; where that sum is exactly zero, the sign that wins over the whole
    model. Disjoint mean: the mean over the vectors whose entry is non-zero and
    has the elected sign. The result is ``theta + scale * mean``.
    """
    if isinstance(density, (int, float)) and not 0.0 < density <= 1.0:
        raise ValueError(f"density={density} must lie in (0, 1]")
    num = jax.tree_util.tree_leaves(taus)[0].shape[0]
    flat = jnp.concatenate([jnp.abs(t).reshape(num, -1) for t in _float_leaves(base, taus)], axis=1)
    size = flat.shape[1]
    keep = jnp.clip(jnp.ceil(density * size).astype(jnp.int32), 1, size)
    threshold = jnp.sort(flat, axis=1)[:, size - keep]

    def trim(b, t, w):
        if not _is_float(b):
            return t
        per_replica = (num,) + (1,) * (t.ndim - 1)
        return jnp.where(jnp.abs(t) >= threshold.reshape(per_replica), t, 0) * w.reshape(per_replica).astype(t.dtype)
    trimmed = jax.tree_util.tree_map(trim, base, taus, leaf_weights)

    sign_sums = jax.tree_util.tree_map(lambda t: jnp.sign(jnp.sum(t, axis=0)), trimmed)
    majority = jnp.sign(sum(jnp.sum(s) for s in _float_leaves(base, sign_sums)))

    def disjoint_mean(b, t, s):
        if not _is_float(b):
            return jnp.zeros(jnp.shape(b), jnp.result_type(b))
        s = jnp.where(s == 0, majority.astype(s.dtype), s)
        agree = jnp.where(s > 0, t > 0, t < 0)
        count = jnp.maximum(jnp.sum(agree, axis=0), 1)
        return scale * jnp.sum(jnp.where(agree, t, 0), axis=0) / count.astype(t.dtype)
    return _apply(base, jax.tree_util.tree_map(disjoint_mean, base, trimmed, sign_sums))


def _dare(base, taus, drop_rate, rng):
    """DARE (Yu et al. 2023): drop each entry with probability ``drop_rate``, rescale the rest.

    Survivors are divided by 1 - drop_rate so each entry keeps its expectation;
    dropped entries are exactly zero. Every replica and leaf draws its own mask.
    """
    if isinstance(drop_rate, (int, float)) and not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate={drop_rate} must lie in [0, 1)")
    if rng is None:
        raise ValueError("method='dare' needs rng, a jax.random key for the drop masks")
    leaves, treedef = jax.tree_util.tree_flatten(taus)
    rngs = jax.random.split(rng, len(leaves))
    kept = [jnp.where(jax.random.bernoulli(r, 1.0 - drop_rate, jnp.shape(t)), t / (1.0 - drop_rate), 0)
            if jnp.issubdtype(t.dtype, jnp.floating) else t
            for r, t in zip(rngs, leaves)]
    return jax.tree_util.tree_unflatten(treedef, kept)


# Each method's options and their defaults; None marks a required one.
_OPTIONS = {
    "task_arithmetic": {},
    "ties": {"density": 0.2, "scale": 1.0},
    "dare": {"drop_rate": None, "rng": None},
}


def merge(base, finetuned, weights, method: str = "task_arithmetic", **options):
    """One tree with base's structure, shapes and dtypes, merged from N finetuned replicas.

    ``task_arithmetic``: ``theta + sum_i w_i tau_i``; the weights need not sum to 1.
    ``ties``: TIES-merging, options ``density`` (0.2) and ``scale`` (lambda, 1.0).
    ``dare``: DARE drop-and-rescale of each task vector, then task arithmetic;
    options ``drop_rate`` and ``rng`` (both required).
    ``weights``: one per replica, shape (N,), or one per replica and top-level
    entry of base, shape (N, G) in ``weight_groups(base)`` order; tied columns
    give the per-replica merge.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; supported values: " + ", ".join(map(repr, METHODS)))
    unknown = sorted(set(options) - set(_OPTIONS[method]))
    if unknown:
        raise ValueError(f"method={method!r} takes options {sorted(_OPTIONS[method])}, not {unknown}")
    opts = {**_OPTIONS[method], **options}
    stacked, num, _ = _stack(base, finetuned)
    weights = jnp.asarray(weights)
    groups = len(weight_groups(base))
    if weights.ndim == 1 and weights.shape[0] != num:
        raise ValueError(f"got {weights.shape[0]} weights for {num} finetuned models; give one weight per model")
    if weights.ndim not in (1, 2) or weights.shape[0] != num or weights.shape[1:] not in ((), (groups,)):
        raise ValueError(f"weights of shape {weights.shape}: give one weight per finetuned model, shape ({num},), "
                         f"or one per model and top-level entry of the tree, shape ({num}, {groups})")
    if not jnp.issubdtype(weights.dtype, jnp.floating):
        weights = weights.astype(jnp.float32)
    taus = _stacked_task_vectors(base, stacked)
    leaf_weights = _leaf_weights(base, weights)
    if method == "ties":
        return _ties(base, taus, leaf_weights, opts["density"], opts["scale"])
    if method == "dare":
        if opts["drop_rate"] is None:
            raise ValueError("method='dare' needs drop_rate, the probability of dropping each entry")
        taus = _dare(base, taus, opts["drop_rate"], opts["rng"])
    return _apply(base, _weighted_sum(taus, leaf_weights))
