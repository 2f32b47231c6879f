"""The device mesh and how arrays are laid out on it.

The mesh comes from ``config.mesh.shape`` (axis name -> devices). The batch is
split over ``data``; parameters are either replicated (data parallel) or, with
FSDP, each split along its largest axis that the data axis divides (XLA
gathers them where a layer needs them). Stacked DeMe replicas add a
``replica`` axis (see ``deme_jax.deme.replicas``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from deme_jax.train.validate import ConfigError


def mesh_sizes(shape: Mapping[str, int], num_devices: int, num_replicas: int = 1) -> dict[str, int]:
    """Axis sizes of ``config.mesh.shape``: -1 takes the devices left over, a ``replica`` size of 0 as many as
    divide both ``num_replicas`` and the device count."""
    sizes = dict(shape)
    if sizes.get("replica") == 0:
        sizes["replica"] = math.gcd(num_replicas, num_devices)
    rest = [name for name, size in sizes.items() if size == -1]
    known = math.prod(size for size in sizes.values() if size != -1)
    if len(rest) > 1 or any(size < 1 for size in sizes.values() if size != -1) or num_devices % known:
        raise ConfigError(f"config.mesh.shape={dict(shape)} does not fit {num_devices} devices: give positive "
                          "sizes whose product divides the device count, and -1 for at most one axis.")
    for name in rest:
        sizes[name] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(f"config.mesh.shape={dict(shape)} uses {math.prod(sizes.values())} of the {num_devices} "
                          "devices; make the sizes multiply to the device count (or use -1 for one axis).")
    if sizes.get("replica", 1) > 1 and num_replicas % sizes["replica"]:
        raise ConfigError(f"config.mesh.shape replica={sizes['replica']} does not divide the {num_replicas} "
                          "replicas; use a divisor of config.deme.num_replicas (or 0).")
    return sizes


def make_mesh(shape: Mapping[str, int], num_replicas: int = 1) -> Mesh:
    """The mesh of ``config.mesh.shape`` over all devices of all processes (Auto axes: XLA propagates shardings)."""
    sizes = mesh_sizes(shape, jax.device_count(), num_replicas)
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))


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
