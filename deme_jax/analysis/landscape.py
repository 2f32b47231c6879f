"""The loss landscape on a 2-D plane around the pretrained weights, over the whole range and per interval.

Directions are two task vectors (where finetuned replicas exist) or
filter-normalised random directions (Li et al. 2018: each filter of the
direction scaled to the norm of the same filter of the weights), so the plane
shows whether the intervals prefer different regions of weight space.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from deme_jax.diffusion import add_noise, epsilon_loss
from deme_jax.diffusion.timesteps import interval_means, spread_timesteps


def filter_normalized_direction(params, rng):
    """A random direction with each filter (last axis: output channels) as long as the weights' filter.

    Biases and norm scales (1-D leaves) get no direction, as in Li et al.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(rng, len(leaves))

    def one(p, key):
        if p.ndim < 2:
            return jnp.zeros_like(p)
        d = jax.random.normal(key, p.shape, p.dtype)
        axes = tuple(range(p.ndim - 1))
        norm = lambda x: jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True))
        return d * norm(p) / (norm(d) + 1e-10)

    return jax.tree_util.tree_unflatten(treedef, [one(p, k) for p, k in zip(leaves, keys)])


def landscape(model, params, schedule, images, direction1, direction2, boundaries, coordinates, rng) -> np.ndarray:
    """Loss on the grid ``params + a * d1 + b * d2`` for a, b in ``coordinates``: shape (K + 1, G, G).

    Row 0 is the loss over the whole range, row k + 1 over interval k; every
    point uses the same images, noise and evenly spread timesteps.
    """
    t = spread_timesteps(images.shape[0], schedule.num_train_timesteps)
    noise = jax.random.normal(rng, images.shape, images.dtype)
    x_t = add_noise(schedule, images, noise, t)

    @jax.jit
    def losses_at(a, b):
        p = jax.tree_util.tree_map(lambda w, d1, d2: w + a * d1 + b * d2, params, direction1, direction2)
        per_example = epsilon_loss(model.apply({"params": p}, x_t, t), noise)
        return jnp.concatenate([per_example.mean()[None], interval_means(per_example, t, boundaries)])

    grid = np.stack([[np.asarray(losses_at(a, b)) for a in coordinates] for b in coordinates])  # (G_b, G_a, K+1)
    return np.moveaxis(grid, -1, 0)


def plot_landscape(grid: np.ndarray, coordinates, boundaries, path, axis_labels=("direction 1", "direction 2")):
    """One contour panel for the whole range and one per interval, each with its own levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = ["all timesteps"] + [f"t in [{a}, {b})" for a, b in zip(boundaries[:-1], boundaries[1:])]
    fig, axes = plt.subplots(1, len(titles), figsize=(3.2 * len(titles), 3.2), squeeze=False)
    for ax, values, title in zip(axes[0], grid, titles):
        levels = np.quantile(values, np.linspace(0, 1, 12))
        contour = ax.contourf(coordinates, coordinates, values, levels=np.unique(levels), cmap="viridis")
        ax.plot(0, 0, "r*", markersize=8)
        best = np.unravel_index(np.argmin(values), values.shape)
        ax.plot(coordinates[best[1]], coordinates[best[0]], "wx", markersize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(axis_labels[0], fontsize=8)
        ax.set_ylabel(axis_labels[1], fontsize=8)
        fig.colorbar(contour, ax=ax, fraction=0.046)
    fig.suptitle("held-out loss around the pretrained weights (*: pretrained, x: lowest)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
