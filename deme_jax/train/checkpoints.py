"""Resumable checkpoints: one orbax CheckpointManager with the train state, the data
stream's position and the config as named items.

Orbax writes each step into a temporary directory and renames it when complete,
so a save killed half-way leaves the previous checkpoints as they were; a
restart ignores the unfinished one. Orbax keeps no checksums, so once a save is
complete its files' SHA-256 go into ``<step>/checksums.json``; restoring
verifies them, and a checkpoint damaged after it was written (a file cut short,
a flipped byte) is moved to ``workdir/damaged_checkpoints/`` (never deleted)
and the one before it is used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from absl import logging

CHECKSUMS = "checksums.json"
DAMAGED = "damaged_checkpoints"


class DamagedCheckpointError(RuntimeError):
    """No checkpoint of a workdir reads completely."""


class DiskFullError(OSError):
    """A save ran out of space; the message names the workdir and the space a checkpoint needs."""


def file_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory`` (but the checksum file), by relative path."""
    digests = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digests[path.relative_to(directory).as_posix()] = digest.hexdigest()
    return digests


def is_disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` or an error it wraps is "no space left on device" (orbax wraps its writers' errors)."""
    while err is not None:
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


class Checkpoints:
    def __init__(self, workdir: str | Path, keep: int, asynchronous: bool = True):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        self.keep = keep
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data", "config"),
                                             options=options)
        self.unsummed: list[int] = []  # saved steps whose checksums are not written yet

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, config: dict) -> None:
        """Starts saving ``step`` (asynchronously); the saves before it are complete and summed first."""
        self.wait()
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config)), force=True)
        self.unsummed.append(step)

    def wait(self) -> None:
        """Waits for the saves in flight and writes their checksums."""
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in self.unsummed:
                if (self.directory / str(step)).is_dir():  # not yet rotated out by max_to_keep
                    digests = file_digests(self.directory / str(step))
                    (self.directory / str(step) / CHECKSUMS).write_text(json.dumps(digests, indent=1) + "\n")
        self.unsummed.clear()

    def disk_full_error(self) -> DiskFullError:
        """What to say when a write in the workdir ran out of space: the space a checkpoint needs, and which
        checkpoint a restart continues from (orbax finishes a save by a rename, so the ones before are whole)."""
        self.manager.reload()
        kept = list(self.manager.all_steps())
        size = max((sum(p.stat().st_size for p in (self.directory / str(s)).rglob("*") if p.is_file())
                    for s in kept), default=0) / 2**20
        free = shutil.disk_usage(self.workdir).free / 2**20
        return DiskFullError(
            f"{self.workdir} ran out of disk space ({free:.1f} MiB free; a checkpoint takes {size:.1f} MiB and "
            f"{self.keep} are kept). The checkpoint of step {max(kept, default='none')} "
            f"is intact: free at least {2 * size:.1f} MiB (or lower config.train.keep_checkpoints) and run the same "
            "command to continue.")

    def verify(self, step: int) -> None:
        """Raises DamagedCheckpointError if a file of ``step`` differs from its checksum (a checkpoint saved
        just before a kill may have none yet: reading it whole is then its check)."""
        directory = self.directory / str(step)
        if not (directory / CHECKSUMS).is_file():
            return
        expected = json.loads((directory / CHECKSUMS).read_text())
        found = file_digests(directory)
        bad = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
        if bad:
            raise DamagedCheckpointError(f"{len(bad)} file(s) differ from their checksums: {bad[:3]}")

    def restore(self, step: int, abstract_state):
        """The state, laid out as ``abstract_state``'s shardings, and the data stream's position."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def restore_latest(self, abstract_state):
        """``(state, data_state, step)`` of the newest checkpoint that reads completely, or None if there is none.

        A damaged one is moved aside with a warning and the one before it tried; if none reads, a
        DamagedCheckpointError names the workdir.
        """
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                self.verify(step)
                return (*self.restore(step, abstract_state), step)
            except Exception as err:  # TensorStore, orbax and JSON report damage in their own error types
                damaged.append(step)
                self.move_aside(step, err)
        if damaged:
            raise DamagedCheckpointError(
                f"no checkpoint in {self.directory} reads completely (damaged: steps {damaged}, moved to "
                f"{self.workdir / DAMAGED}). Restore the checkpoints from a copy, or start again in a new --workdir.")
        return None

    def move_aside(self, step: int, err: Exception) -> None:
        """Moves a damaged step out of orbax's sight, keeping it for inspection."""
        if jax.process_index() == 0:
            target = self.workdir / DAMAGED / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            target.parent.mkdir(exist_ok=True)
            shutil.move(self.directory / str(step), target)
            logging.warning("The checkpoint of step %d in %s is damaged (%s: %s); moved it to %s and trying the one "
                            "before it.", step, self.directory, type(err).__name__, str(err)[:300], target)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"moved damaged checkpoint {step}")
        self.manager.reload()

    def restore_as_saved(self, step: int) -> dict:
        """The raw state of ``step`` onto this process's first device, whatever mesh wrote it (for export)."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(None, fallback_sharding=device))).state

    def close(self) -> None:
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
