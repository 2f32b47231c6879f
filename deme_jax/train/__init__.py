"""The training engine: train state, the jitted step, mesh and shardings, checkpoints, the loop."""

from deme_jax.train.distributed import initialize_from_environment
from deme_jax.train.loop import NonFiniteLossError, Preempted, train_and_evaluate
from deme_jax.train.state import TrainState
from deme_jax.train.validate import ConfigError, validate_config

__all__ = [
    "ConfigError",
    "NonFiniteLossError",
    "Preempted",
    "TrainState",
    "initialize_from_environment",
    "train_and_evaluate",
    "validate_config",
]
