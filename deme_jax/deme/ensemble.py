"""The timestep-routed ensemble: replica i answers for the timesteps of its interval.

It costs N models' memory and no extra compute per sampling step, which is
what merging is compared against. It duck-types a Flax module's ``apply``, so
samplers and losses take it where they take a UNet.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from deme_jax.diffusion.timesteps import interval_index
from deme_jax.models.unet import UNet


@dataclasses.dataclass(frozen=True)
class TimestepEnsemble:
    """``apply({"params": stacked}, x, t, *conditioning)``; replica ``i`` serves
    ``[boundaries[i], boundaries[i + 1])``."""

    model: UNet
    boundaries: tuple[int, ...]

    def route(self, t: jax.Array) -> jax.Array:
        """The replica index of each timestep."""
        return interval_index(t, self.boundaries)

    def apply(self, variables, x, t, *conditioning, **kwargs):
        stacked = variables["params"]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), x.shape[:1])
        replica = self.route(t)

        def one_replica():  # sampling: the whole batch is at one timestep
            params = jax.tree_util.tree_map(lambda p: p[replica[0]], stacked)
            return self.model.apply({"params": params}, x, t, *conditioning, **kwargs)

        def per_example():  # mixed timesteps: every replica runs, each example keeps its own
            eps = jax.vmap(lambda p: self.model.apply({"params": p}, x, t, *conditioning, **kwargs))(stacked)
            return jnp.take_along_axis(eps, replica[None, :, None, None, None], axis=0)[0]

        return jax.lax.cond(jnp.all(replica == replica[0]), one_replica, per_example)
