"""DeMe: decoupled finetuning of N replicas, each on its own timestep interval, then merging them."""

from deme_jax.deme.ensemble import TimestepEnsemble
from deme_jax.deme.finetune import finetune, load_pretrained, load_replicas
from deme_jax.deme.intervals import (
    check_global_prob,
    conflict_cuts,
    conflict_partition,
    explicit_partition,
    interval_timesteps,
    log_snr,
    log_snr_partition,
    make_partition,
    replica_timesteps,
    uniform_partition,
    within_similarity,
)
from deme_jax.deme.merging import merge_replicas
from deme_jax.deme.objective import deme_loss, uncertainty_weighted_loss

__all__ = [
    "TimestepEnsemble",
    "check_global_prob",
    "conflict_cuts",
    "conflict_partition",
    "deme_loss",
    "explicit_partition",
    "finetune",
    "interval_timesteps",
    "load_pretrained",
    "load_replicas",
    "log_snr",
    "log_snr_partition",
    "make_partition",
    "merge_replicas",
    "replica_timesteps",
    "uncertainty_weighted_loss",
    "uniform_partition",
    "within_similarity",
]
