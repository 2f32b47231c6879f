"""Joining a multi-process run: ``jax.distributed.initialize`` from the environment.

``launch/local.sh`` sets ``DEME_COORDINATOR_ADDRESS``, ``DEME_NUM_PROCESSES`` and
``DEME_PROCESS_ID`` for processes on one machine (CPU collectives over gloo).
``launch/slurm.sbatch`` and ``launch/tpu_pod.sh`` set ``DEME_DISTRIBUTED=1``:
on SLURM and Cloud TPU VMs JAX finds its peers itself.
"""

from __future__ import annotations

import os

import jax


def initialize_from_environment() -> None:
    """Initialises ``jax.distributed`` when the environment describes several processes; no-op otherwise."""
    if "DEME_COORDINATOR_ADDRESS" in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["DEME_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["DEME_NUM_PROCESSES"]),
            process_id=int(os.environ["DEME_PROCESS_ID"]),
        )
    elif os.environ.get("DEME_DISTRIBUTED") == "1":
        jax.distributed.initialize()
