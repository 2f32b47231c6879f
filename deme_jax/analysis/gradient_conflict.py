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


def plot_conflict(matrix: np.ndarray, boundaries, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"[{a}, {b})" for a, b in zip(boundaries[:-1], boundaries[1:])]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title("gradient cosine similarity between timestep intervals")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
