"""The device mesh and how arrays are laid out on it.

One mesh axis, ``data``: the batch is split over it; parameters are either
replicated (data parallel) or, with FSDP, each split along its largest axis
that the device count divides (XLA gathers them where a layer needs them).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def make_mesh() -> Mesh:
    """All devices of all processes on one ``data`` axis (XLA propagates shardings: Auto axis type)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Split the largest axis that ``n`` divides; small or indivisible arrays stay replicated."""
    axes = [a for a in np.argsort(shape)[::-1] if shape[a] % n == 0 and shape[a] >= n]
    if n == 1 or not axes or int(np.prod(shape)) < 2 ** 14:
        return P()
    spec = [None] * len(shape)
    spec[axes[0]] = "data"
    return P(*spec)


def state_shardings(mesh: Mesh, abstract_state, fsdp: bool):
    """A sharding for every leaf of the train state (optimizer moments follow their parameters)."""
    n = mesh.shape["data"]
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, fsdp_spec(x.shape, n) if fsdp else P()), abstract_state)


def global_batch(local_images: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Assembles each process's rows into one global array sharded over ``data``."""
    return jax.make_array_from_process_local_data(sharding, local_images)
