"""Gradient conflict between timestep intervals: the cosine similarity of the loss gradients of K intervals.

The paper's motivation for decoupling: gradients of distant timestep ranges
point in different (even opposite) directions, so one set of weights trained
on all of them is a compromise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from deme_jax.diffusion import add_noise, epsilon_loss


def interval_gradients(model, params, schedule, images, boundaries, rng) -> jax.Array:
    """(K, P) flattened gradients of the mean denoising loss with t drawn uniformly in each interval.

    Every interval sees the same images and the same noise, so only the
    timesteps differ between rows.
    """
    boundaries = np.asarray(boundaries)
    rng_t, rng_noise = jax.random.split(rng)
    noise = jax.random.normal(rng_noise, images.shape, images.dtype)
    u = jax.random.uniform(rng_t, (images.shape[0],))

    def grad_of(low, high):
        t = (low + u * (high - low)).astype(jnp.int32)

        def loss(p):
            eps = model.apply({"params": p}, add_noise(schedule, images, noise, t), t)
            return epsilon_loss(eps, noise).mean()

        g = jax.grad(loss)(params)
        return jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(g)])

    grad_of = jax.jit(grad_of)
    return jnp.stack([grad_of(low, high) for low, high in zip(boundaries[:-1], boundaries[1:])])


def cosine_matrix(vectors) -> np.ndarray:
    """(K, K) cosine similarities of the rows of ``vectors``, in float64."""
    v = np.asarray(vectors, np.float64)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    return v @ v.T


def gradient_conflict(model, params, schedule, batches, boundaries, rng) -> np.ndarray:
    """The cosine matrix of the interval gradients summed over ``batches`` (a list of image arrays)."""
    total = None
    for k, images in enumerate(batches):
        g = interval_gradients(model, params, schedule, images, boundaries, jax.random.fold_in(rng, k))
        total = g if total is None else total + g
    return cosine_matrix(total)


def plot_conflict(matrix: np.ndarray, boundaries, path, partition=None) -> None:
    """The cosine matrix as a heatmap, each cell written out when there are few; ``partition`` (a subset of
    ``boundaries``) is drawn as the outlines of its intervals' blocks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    labels = [f"[{a}, {b})" for a, b in zip(boundaries[:-1], boundaries[1:])]
    few = len(labels) <= 8
    size = min(1.2 * len(labels), 9.0)
    fig, ax = plt.subplots(figsize=(size + 2, size + 1.5))
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8 if few else 6)
    ax.set_yticks(range(len(labels)), labels, fontsize=8 if few else 6)
    if few:
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8)
    title = "gradient cosine similarity between timestep intervals"
    if partition is not None:
        edges = [list(boundaries).index(b) for b in partition]
        for a, b in zip(edges[:-1], edges[1:]):
            ax.add_patch(Rectangle((a - 0.5, a - 0.5), b - a, b - a, fill=False, edgecolor="black", lw=2))
        title += "\nboxes: the chosen intervals " + ", ".join(f"[{a}, {b})" for a, b in zip(partition[:-1],
                                                                                            partition[1:]))
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
