"""Resumable checkpoints: one orbax CheckpointManager with the train state, the data
stream's position and the config as named items.

Orbax writes each step into a temporary directory and renames it when complete,
so a save killed half-way leaves the previous checkpoints as they were; a
restart ignores the unfinished one. Orbax keeps no checksums, so once a save is
complete its files' SHA-256 go into ``<step>/checksums.json``; restoring
verifies them, and a checkpoint damaged after it was written (a file cut short,
a flipped byte) is moved to ``workdir/damaged_checkpoints/`` (never deleted)
and the one before it is used. A checkpoint that is whole but holds another
state than the one asked for (another model, optimizer or LoRA layout) is
refused with the differences and left where it is.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
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


class CheckpointMismatchError(ValueError):
    """A whole checkpoint holds another tree of arrays than the one to restore."""


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


def tree_layout(tree) -> dict[str, tuple]:
    """``path -> (shape, dtype)`` of every array leaf, paths written alike for dataclasses, dicts and lists."""
    def name(key) -> str:
        return str(getattr(key, "name", getattr(key, "key", getattr(key, "idx", key))))

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(name(k) for k in path): (tuple(leaf.shape), jax.numpy.dtype(leaf.dtype).name)
            for path, leaf in leaves}


def layout_differences(saved: dict, wanted: dict, most: int = 4) -> list[str]:
    """The first ``most`` differences between two ``tree_layout``s, in words."""
    missing = sorted(wanted.keys() - saved.keys())
    extra = sorted(saved.keys() - wanted.keys())
    changed = sorted(k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k])
    words = ([f"{k} is not in the checkpoint" for k in missing] + [f"{k} is only in the checkpoint" for k in extra]
             + [f"{k} is {saved[k][0]} {saved[k][1]} in the checkpoint, {wanted[k][0]} {wanted[k][1]} now"
                for k in changed])
    more = len(words) - most
    return words[:most] + ([f"and {more} more"] if more > 0 else [])


def is_disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` or an error it wraps is "no space left on device" (orbax wraps its writers' errors)."""
    while err is not None:
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


class Checkpoints:
    def __init__(self, workdir: str | Path, keep: int, asynchronous: bool = True, read_only: bool = False):
        """``read_only``: for readers of a workdir that a run may be writing (its unfinished save is its own)."""
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        self.keep = keep
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                               cleanup_tmp_directories=not read_only, read_only=read_only)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler()}  # named up front, so metadata reads before a restore
        self.manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)
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
                directory = self.directory / str(step)
                if directory.is_dir():  # not yet rotated out by max_to_keep
                    digests = file_digests(directory)
                    partial = directory / f"{CHECKSUMS}.partial"  # a full disk or a kill leaves no half file
                    partial.write_text(json.dumps(digests, indent=1) + "\n")
                    os.replace(partial, directory / CHECKSUMS)
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

    def verify(self, step: int) -> bool:
        """Raises DamagedCheckpointError if a file of ``step`` differs from its checksum; returns whether it had
        checksums (one saved just before a kill may have none yet: reading it whole is then its check)."""
        directory = self.directory / str(step)
        if not (directory / CHECKSUMS).is_file():
            return False
        try:
            expected = json.loads((directory / CHECKSUMS).read_text())
        except ValueError:  # cut short by an older version's non-atomic write: the checkpoint itself may be whole
            logging.warning("The checksums of step %d in %s do not read; checking the checkpoint by reading it.",
                            step, self.directory)
            return False
        found = file_digests(directory)
        bad = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
        if bad:
            raise DamagedCheckpointError(f"{len(bad)} file(s) differ from their checksums: {bad[:3]}")
        return True

    def check_layout(self, step: int, abstract_state) -> None:
        """Raises CheckpointMismatchError if ``step`` holds other arrays than ``abstract_state`` (read from the
        checkpoint's metadata, before any array)."""
        saved = tree_layout(self.manager.item_metadata(step).state.tree)
        differences = layout_differences(saved, tree_layout(abstract_state))
        if differences:
            raise CheckpointMismatchError(
                f"The checkpoint of step {step} in {self.directory} holds another state than this config trains "
                f"({'; '.join(differences)}). Continue it with the config it was saved with "
                f"({self.workdir / 'config.json'}), or use a new --workdir; the checkpoint is left as it is.")

    def restore(self, step: int, abstract_state):
        """The state, laid out as ``abstract_state``'s shardings, and the data stream's position."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def restore_latest(self, abstract_state):
        """``(state, data_state, step)`` of the newest checkpoint that reads completely, or None if there is none.

        A damaged one (a file that differs from its checksum, or, without checksums, one that does not read) is
        moved aside with a warning and the one before it tried; if none reads, a DamagedCheckpointError names the
        workdir. A whole one that holds another state raises CheckpointMismatchError, and any other error while
        reading a checksummed one (memory, a file system hiccup) is raised as it is: both leave it in place.
        """
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                checksummed = self.verify(step)
            except DamagedCheckpointError as err:
                damaged.append(step)
                self.move_aside(step, err)
                continue
            try:
                self.check_layout(step, abstract_state)
                return (*self.restore(step, abstract_state), step)
            except CheckpointMismatchError:
                raise
            except Exception as err:  # TensorStore, orbax and JSON report damage in their own error types
                if checksummed:
                    raise
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
