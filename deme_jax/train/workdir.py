"""Keeps a training workdir safe: two runs on it would overwrite each other's checkpoints (``WorkdirLock``), and a
restart whose config its checkpoint cannot hold would fail late or train something else (``check_config_drift``).
``open_run`` does both before anything compiles."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

from deme_jax.train.validate import ConfigError

LOCK_FILE = "lock.json"
HISTORY_FILE = "config_history.jsonl"


class WorkdirBusyError(ConfigError):
    """A live run holds the workdir; the message names it and what to do."""


class ConfigDriftError(ConfigError):
    """The new config changes fields that the checkpoint in the workdir cannot hold."""


def _utc_iso(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).isoformat(timespec="seconds")


def _complete_copy(path: Path, record: dict) -> Path:
    """``record`` as JSON beside ``path``, to be linked or renamed into place so that readers never see half of it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    return tmp


def _describe(holder: dict) -> str:
    job = f", job {holder['job_id']}" if holder.get("job_id") else ""
    age = time.time() - holder["heartbeat_unix"]
    return f"host {holder['host']}, pid {holder['pid']}, started {holder['start_time']}{job}; heartbeat {age:.0f} s ago"


class WorkdirLock:
    """Holds ``workdir/lock.json`` so that a second run on the workdir refuses at once; also a context manager.

    The file names the holder (host, pid, start time, job id); its modification time is a heartbeat that a
    daemon thread refreshes every ``heartbeat_every_s`` (``os.utime``: a beat never rewrites the file, so it
    cannot overwrite the lock of a run that took over between its check and its write). A holder is gone when
    its pid is dead on this host or its heartbeat is older than ``stale_after_s`` (the only sign from another host,
    and what catches a reused pid); its lock is then taken over with a warning. The processes of a multi-host job
    pass one ``job_id`` (derived alike on each, e.g. from the coordinator address) and share a live lock of that
    job, so only process 0 needs to hold and heartbeat it. The file is created by a hard link, so the workdir's file
    system must support them.
    """

    def __init__(self, workdir: str | Path, job_id: str | None = None, heartbeat_every_s: float = 30.0,
                 stale_after_s: float = 300.0):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.job_id = job_id
        self.heartbeat_every_s = heartbeat_every_s
        self.stale_after_s = stale_after_s
        self.host = socket.gethostname()
        self.record: dict | None = None  # what this process writes into the lock file
        self.shared = False  # True while another process of the same job holds the lock
        self._stop_heartbeat = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._lost = threading.Event()

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> WorkdirLock:
        """Takes the lock (or shares a live one of the same job); raises WorkdirBusyError if a live run holds it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.record = dict(host=self.host, pid=os.getpid(), start_time=_utc_iso(now), start_unix=now,
                           job_id=self.job_id, token=uuid.uuid4().hex)
        while not self._create():  # each pass ends in a decision unless the lock file changed meanwhile
            text, holder = self._read()
            if holder is None:  # released since
                continue
            if self._is_live(holder):
                if self.job_id is not None and holder.get("job_id") == self.job_id:
                    self.shared = True
                    return self
                raise WorkdirBusyError(
                    f"--workdir={self.workdir} is in use by the run on {_describe(holder)}. Wait for it to finish, "
                    f"stop that run, or use another --workdir; if you are sure it is dead, delete {self.path}.")
            if self._take_over(text, holder):
                break
        self._stop_heartbeat.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._heartbeat.start()
        return self

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if this process still owns it."""
        if self._heartbeat is not None:
            self._stop_heartbeat.set()
            self._heartbeat.join()
            self._heartbeat = None
        if self._owns_lock_file():
            self.path.unlink()
        self.record, self.shared = None, False

    def _create(self) -> bool:
        tmp = _complete_copy(self.path, self.record)
        try:
            os.link(tmp, self.path)  # atomic; fails if the lock file exists
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def _read(self) -> tuple[str | None, dict | None]:
        """The lock file's text and its holder, with the file's modification time as ``heartbeat_unix``."""
        try:
            with open(self.path) as f:
                text, heartbeat = f.read(), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None, None
        return text, {**json.loads(text), "heartbeat_unix": heartbeat}

    def _is_live(self, holder: dict) -> bool:
        if time.time() - holder["heartbeat_unix"] > self.stale_after_s:
            return False
        if holder["host"] == self.host:
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # alive, under another user
                pass
        return True

    def _owns_lock_file(self) -> bool:
        holder = self._read()[1]
        return self.record is not None and holder is not None and holder.get("token") == self.record["token"]

    def _take_over(self, stale_text: str, holder: dict) -> bool:
        """Replaces the stale lock unless another process does: every taker of one stale lock tries to create
        the same claim file, and only the one that creates it and still finds that lock in place replaces it."""
        digest = hashlib.sha256(stale_text.encode()).hexdigest()[:16]
        claim = self.path.with_name(f"{self.path.name}.takeover-{digest}")
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            if self.job_id is not None and self._claim_is_recent(claim):
                time.sleep(0.1)  # likely a process of this job, restarting with it: its lock will be shared
                return False
            raise WorkdirBusyError(f"--workdir={self.workdir}: another process is taking over the lock of a run that "
                                   f"is gone ({_describe(holder)}). If no run uses it, delete {self.path}.") from None
        try:
            if self._read()[1] != holder:  # replaced, or its holder beat again
                return False
            self.path.unlink()
            if not self._create():
                return False
        finally:
            claim.unlink()
        logging.warning("Took over --workdir=%s from a run that is gone (%s).", self.workdir, _describe(holder))
        return True

    @staticmethod
    def _claim_is_recent(claim: Path, within_s: float = 30.0) -> bool:
        try:
            return time.time() - claim.stat().st_mtime < within_s
        except FileNotFoundError:  # released meanwhile
            return True

    @property
    def lost(self) -> bool:
        """True once the heartbeat found the lock file taken over by another run (this run must not save)."""
        return self._lost.is_set()

    def _beat(self) -> None:
        while not self._stop_heartbeat.wait(self.heartbeat_every_s):
            try:
                if not self._owns_lock_file():
                    logging.warning("%s is no longer this run's lock; its heartbeat stops.", self.path)
                    self._lost.set()
                    return
                now = time.time()
                os.utime(self.path, (now, now))
            except (OSError, ValueError) as err:  # a passing filesystem error or half-written file must not end it
                logging.warning("Could not refresh the heartbeat in %s: %s", self.path, err)


# The fields a restart must keep, as dotted paths that cover what lies under them ("model": every model field). The
# checkpoint's parameters and optimizer state take their shapes from the model and the DeMe replica layout and their
# sharding from the mesh; exact resume replays the data order and noise fixed by the seed, data source and batch.
FIXED_FIELDS = (
    "model", "diffusion", "deme.num_replicas", "deme.partition", "deme.boundaries", "deme.channel_projection",
    "deme.pretrained", "deme.mode", "deme.weighting", "deme.uncertainty_tasks", "deme.lora", "deme.lora_rank",
    "deme.lora_targets", "data.image_size", "data.channels", "data.name", "data.split", "data.folder",
    "data.heldout_fraction", "data.heldout_folder", "seed", "train.batch_size", "mesh.fsdp",
)
# Fields under FIXED_FIELDS that may change all the same: they change how a step is computed, not its result.
CHANGEABLE_FIELDS = ("model.remat",)


class _Absent:
    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()  # the side of a change where the field does not exist


class Change(NamedTuple):
    """One config field that differs between the workdir's config and the new one (``ABSENT`` on a missing side)."""
    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field}: {_as_tuples(self.old)!r} in the workdir -> {_as_tuples(self.new)!r} now"


def _as_tuples(value: Any) -> Any:
    """Lists as tuples, so that a config read back from JSON equals the one it was written from."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _leaves(config: dict, prefix: str = "") -> dict[str, Any]:
    leaves = {}
    for key, value in config.items():
        leaves.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return leaves


def check_config_drift(stored: dict, new: dict) -> list[Change]:
    """The changes from the workdir's ``stored`` config to ``new`` (dicts from ``json.loads(config.to_json())``),
    for the caller to log and pass to ``record_config``. Raises ConfigDriftError naming every FIXED_FIELDS field
    changed, added or removed, since the checkpoint cannot hold it."""
    old_leaves, new_leaves = _leaves(stored), _leaves(new)
    changes = [Change(field, old_leaves.get(field, ABSENT), new_leaves.get(field, ABSENT))
               for field in sorted(old_leaves.keys() | new_leaves.keys())]
    changes = [c for c in changes if _as_tuples(c.old) != _as_tuples(c.new)]
    refused = [c for c in changes if c.field not in CHANGEABLE_FIELDS
               and any(c.field == f or c.field.startswith(f + ".") for f in FIXED_FIELDS)]
    if refused:
        raise ConfigDriftError(f"The config changes what the checkpoint in this workdir was trained with: "
                               f"{'; '.join(map(str, refused))}. Use a new --workdir for this config, or revert "
                               f"these fields to continue the run.")
    return changes


def record_config(workdir: str | Path, new: dict, changes: list[Change]) -> None:
    """Makes ``new`` the config.json the next restart is compared with, and appends to config_history.jsonl the
    line that keeps what it replaced: time, host, each change's field, old and new value (an absent side left out)."""
    config_path = Path(workdir) / "config.json"
    os.replace(_complete_copy(config_path, new), config_path)
    entry = dict(time=_utc_iso(time.time()), host=socket.gethostname(), changes=[
        {"field": c.field, **{side: value for side, value in (("old", c.old), ("new", c.new)) if value is not ABSENT}}
        for c in changes])
    with open(Path(workdir) / HISTORY_FILE, "a") as history:
        history.write(json.dumps(entry) + "\n")


def job_id() -> str | None:
    """One token shared by the processes of this job (None for one process), so they share the workdir lock while
    another job (a requeued copy, a double launch) is refused."""
    if jax.process_count() == 1:
        return None
    from jax.experimental import multihost_utils

    token = np.frombuffer(uuid.uuid4().bytes[:8], np.uint32)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(token)).astype(np.uint32)).hex()


@contextlib.contextmanager
def open_run(workdir: str | Path, config: dict):
    """Holds ``workdir`` for one run of ``config`` (a dict from ``config.to_json()``): refuses if a live run holds
    it or if the config changes what its checkpoint holds, else records the config (and what changed) and yields.

    Nothing in the workdir changes before both checks pass. Yields the ``WorkdirLock`` (whose ``lost`` says
    whether another run took the workdir over).
    """
    workdir = Path(workdir)
    with WorkdirLock(workdir, job_id=job_id()) as lock:
        stored = workdir / "config.json"
        changes = check_config_drift(json.loads(stored.read_text()), config) if stored.is_file() else []
        for change in changes:
            logging.warning("Config changed since this workdir's last run: %s", change)
        if jax.process_index() == 0:
            record_config(workdir, config, changes)
        yield lock
