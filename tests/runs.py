"""Runs of the smallest training config through the real `deme` command, and how to compare their results."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from deme_jax.models import build_model, init_params
from deme_jax.train.state import create_train_state, make_optimizer
from tests import tiny_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "tests" / "tiny_config.py")


def deme(args, env=None, log=None):
    """Runs the real `deme` command in a fresh process (output to ``log``, else a pipe)."""
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "deme_jax.cli", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=out, stderr=subprocess.STDOUT, text=True)


def final_params(workdir):
    """The newest checkpoint's parameters, read with orbax as numpy arrays."""
    manager = ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", item_names=("state",))
    step = manager.latest_step()
    config, key = tiny_config.get_config(), jax.random.key(0)
    model, optimizer = build_model(config.model), make_optimizer(config.optim)
    abstract = jax.eval_shape(lambda: create_train_state(init_params(model, key), optimizer, key))
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever topology wrote it
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), abstract)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    manager.close()
    return step, jax.tree_util.tree_map(np.asarray, {"params": state.params, "ema": state.ema_params})


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)
