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

    def restore_as_saved(self, step: int) -> dict:
        """The raw state of ``step`` onto this process's first device, whatever mesh wrote it (for export)."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(None, fallback_sharding=device))).state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
