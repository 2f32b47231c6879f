"""Resumable checkpoints: one orbax CheckpointManager with the train state, the data
stream's position and the config as named items.

Orbax writes each step into a temporary directory and renames it when complete,
so a save killed half-way leaves the previous checkpoints as they were; a
restart ignores the unfinished one.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, workdir: str | Path, keep: int, asynchronous: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints",
                                             item_names=("state", "data", "config"), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, config: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config)), force=True)

    def restore(self, step: int, abstract_state):
        """The state, laid out as ``abstract_state``'s shardings, and the data stream's position."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)


def is_training_workdir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and (Path(path) / "checkpoints").is_dir()


def load_trained_unet(workdir: str | Path, step: int | None = None):
    """``(model, ema_params, step)`` from a training workdir's latest (or given) checkpoint.

    The EMA parameters are what a run is evaluated and exported with. A DeMe
    run of stacked replicas gives them stacked (a leading replica axis). The
    loss's own parameters (ANT-UW) are left out. The state is read as saved,
    onto this process's first device, whatever mesh wrote it.
    """
    import json

    from ml_collections import ConfigDict

    from deme_jax.train.loop import build_model
    from deme_jax.train.step import model_params

    workdir = Path(workdir)
    config = ConfigDict(json.loads((workdir / "config.json").read_text()))
    checkpoints = Checkpoints(workdir, keep=config.train.keep_checkpoints, asynchronous=False)
    step = checkpoints.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir / 'checkpoints'} holds no finished checkpoint yet.")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state = checkpoints.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(None, fallback_sharding=device))).state
    checkpoints.close()
    return build_model(config.model), model_params(state["ema_params"]), step


def load_model(path: str | Path):
    """``(model, params)`` from a training workdir (its latest EMA parameters), an orbax model or a diffusers dir."""
    from absl import logging

    from deme_jax import interop

    if is_training_workdir(path):
        model, params, step = load_trained_unet(path)
        logging.info("%s: the EMA parameters of step %d", path, step)
        return model, params
    return interop.load_unet(path)
