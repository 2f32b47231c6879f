"""DeMe: decoupled finetuning of N replicas, each on its own timestep interval."""

from deme_jax.deme.intervals import (
    check_global_prob,
    explicit_partition,
    interval_timesteps,
    log_snr,
    log_snr_partition,
    make_partition,
    replica_timesteps,
    uniform_partition,
)
from deme_jax.deme.objective import deme_loss, uncertainty_weighted_loss

__all__ = [
    "check_global_prob",
    "deme_loss",
    "explicit_partition",
    "interval_timesteps",
    "log_snr",
    "log_snr_partition",
    "make_partition",
    "replica_timesteps",
    "uncertainty_weighted_loss",
    "uniform_partition",
]
