"""DeMe: decoupled finetuning of N replicas, each on its own timestep interval, then merging."""

from deme_jax.deme.ensemble import TimestepEnsemble
from deme_jax.deme.finetune import default_deme_config, finetune, load_replicas
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
    "TimestepEnsemble",
    "check_global_prob",
    "default_deme_config",
    "deme_loss",
    "explicit_partition",
    "finetune",
    "interval_timesteps",
    "load_replicas",
    "log_snr",
    "log_snr_partition",
    "make_partition",
    "replica_timesteps",
    "uncertainty_weighted_loss",
    "uniform_partition",
]
