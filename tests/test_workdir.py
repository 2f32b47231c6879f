"""The workdir lock (refusal, takeover of a gone holder, shared jobs, heartbeat, races) and the config drift check."""

import copy
import datetime
import json
import logging
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from ml_collections import ConfigDict

from deme_jax.train.validate import ConfigError
from deme_jax.train.workdir import (ABSENT, Change, ConfigDriftError, WorkdirBusyError, WorkdirLock,
                                    check_config_drift, record_config)

HOST = socket.gethostname()
STARTED = "2024-01-02T03:04:05+00:00"


@pytest.fixture(scope="module")
def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(workdir, host=HOST, pid=None, heartbeat_age_s=0.0, job_id=None) -> dict:
    """A lock file as another process would have written it."""
    heartbeat = time.time() - heartbeat_age_s
    record = dict(host=host, pid=os.getpid() if pid is None else pid, start_time=STARTED, start_unix=heartbeat - 60,
                  job_id=job_id, token="another process")
    (workdir / "lock.json").write_text(json.dumps(record))
    os.utime(workdir / "lock.json", (heartbeat, heartbeat))
    return record


def lock_file(workdir) -> dict:
    return json.loads((workdir / "lock.json").read_text())


def test_second_lock_on_a_held_workdir_refuses_naming_the_holder(tmp_path):
    with WorkdirLock(tmp_path) as holder:
        started = holder.record["start_time"]
        with pytest.raises(WorkdirBusyError) as refusal:
            WorkdirLock(tmp_path).acquire()
        assert lock_file(tmp_path)["token"] == holder.record["token"]  # the refused lock left the holder's alone
    message = str(refusal.value)
    assert isinstance(refusal.value, ConfigError)
    for part in (f"--workdir={tmp_path}", f"host {HOST}", f"pid {os.getpid()}", f"started {started}",
                 str(tmp_path / "lock.json"), "another --workdir"):
        assert part in message
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(started)
    assert started.endswith("+00:00") and datetime.timedelta(0) <= age < datetime.timedelta(minutes=1)
    assert not (tmp_path / "lock.json").exists()


def test_lock_of_a_dead_process_on_this_host_is_taken_over_with_a_warning(tmp_path, dead_pid, caplog):
    write_lock(tmp_path, pid=dead_pid)
    with caplog.at_level(logging.WARNING), WorkdirLock(tmp_path) as lock:
        assert lock_file(tmp_path)["pid"] == os.getpid() and lock_file(tmp_path)["token"] == lock.record["token"]
    assert f"pid {dead_pid}" in caplog.text and f"host {HOST}" in caplog.text and STARTED in caplog.text


def test_lock_from_another_host_is_judged_by_its_heartbeat(tmp_path, dead_pid, caplog):
    # The pid means nothing on another host: a fresh heartbeat holds even with a pid that is dead here.
    write_lock(tmp_path, host="other-host", pid=dead_pid, heartbeat_age_s=10)
    with pytest.raises(WorkdirBusyError, match=re.escape(f"host other-host, pid {dead_pid}, started {STARTED}")):
        WorkdirLock(tmp_path, stale_after_s=300).acquire()
    # ... and a stale one is taken over even with a pid that is alive here.
    write_lock(tmp_path, host="other-host", pid=os.getpid(), heartbeat_age_s=301)
    with caplog.at_level(logging.WARNING), WorkdirLock(tmp_path, stale_after_s=300):
        assert lock_file(tmp_path)["host"] == HOST
    assert "host other-host" in caplog.text and "301 s ago" in caplog.text


def test_processes_of_one_job_share_the_lock(tmp_path):
    holder = WorkdirLock(tmp_path, job_id="coordinator:1234").acquire()
    peer = WorkdirLock(tmp_path, job_id="coordinator:1234").acquire()
    assert peer.shared and not holder.shared
    with pytest.raises(WorkdirBusyError):
        WorkdirLock(tmp_path, job_id="coordinator:5678").acquire()
    peer.release()
    assert lock_file(tmp_path)["token"] == holder.record["token"]
    holder.release()
    assert not (tmp_path / "lock.json").exists()


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # JAX's warning; the children use no JAX
def test_processes_of_one_job_restarting_on_a_stale_lock_all_start(tmp_path, dead_pid):
    """After a crash the job's processes meet the old lock together: one takes it over and the others, instead
    of losing the race for the take-over claim, share it."""
    context = multiprocessing.get_context("fork")
    for round_ in range(3):
        workdir = tmp_path / str(round_)
        workdir.mkdir()
        write_lock(workdir, pid=dead_pid, job_id="the crashed job")
        assert race(context, workdir, "coordinator:1234") == ["shared", "shared", "shared", "won"]


def test_release_removes_only_this_process_lock(tmp_path):
    lock = WorkdirLock(tmp_path).acquire()
    theirs = write_lock(tmp_path, host="other-host")  # as if another run had taken the lock over
    lock.release()
    assert lock_file(tmp_path) == theirs
    (tmp_path / "lock.json").unlink()
    WorkdirLock(tmp_path).acquire().release()
    assert not (tmp_path / "lock.json").exists()


def test_heartbeat_advances_while_held(tmp_path):
    heartbeat = lambda: (tmp_path / "lock.json").stat().st_mtime  # noqa: E731
    with WorkdirLock(tmp_path, heartbeat_every_s=0.05):
        first, first_beat = lock_file(tmp_path), heartbeat()
        deadline = time.time() + 5
        while heartbeat() == first_beat and time.time() < deadline:
            time.sleep(0.02)
        assert heartbeat() > first_beat and lock_file(tmp_path) == first


def test_heartbeat_leaves_a_lock_another_run_took_over(tmp_path):
    with WorkdirLock(tmp_path, heartbeat_every_s=0.1) as lock:
        assert not lock.lost
        theirs = write_lock(tmp_path, host="other-host")  # long before the first beat
        time.sleep(0.5)
        assert lock_file(tmp_path) == theirs and lock.lost


def wait_until_lost(lock: WorkdirLock, within_s: float = 5.0) -> None:
    deadline = time.time() + within_s
    while not lock.lost and time.time() < deadline:
        time.sleep(0.02)


def test_a_takeover_between_a_heartbeats_check_and_its_beat_is_kept(tmp_path, monkeypatch):
    """The beat after an ownership check must not put this run's lock back over one that replaced it meanwhile."""
    owns_lock_file, taken_over = WorkdirLock._owns_lock_file, threading.Event()

    def taken_over_right_after_the_check(self):
        owns = owns_lock_file(self)
        if owns and threading.current_thread().name == "workdir-lock-heartbeat" and not taken_over.is_set():
            write_lock(tmp_path, host="other-host")
            taken_over.set()
        return owns

    monkeypatch.setattr(WorkdirLock, "_owns_lock_file", taken_over_right_after_the_check)
    with WorkdirLock(tmp_path, heartbeat_every_s=0.05) as lock:
        assert taken_over.wait(5)
        wait_until_lost(lock)
        assert lock.lost and lock_file(tmp_path)["token"] == "another process"
    assert lock_file(tmp_path)["token"] == "another process"


def test_heartbeat_outlives_a_half_written_lock_file(tmp_path):
    """Another writer caught mid-write (an unparsable file) must not end the heartbeat: it still sees the takeover."""
    with WorkdirLock(tmp_path, heartbeat_every_s=0.05) as lock:
        (tmp_path / "lock.json").write_text('{"host": "other-')
        time.sleep(0.3)
        assert not lock.lost
        theirs = write_lock(tmp_path, host="other-host")
        wait_until_lost(lock)
        assert lock.lost and lock_file(tmp_path) == theirs


def race(context, workdir, job_id=None, racers=4) -> list[str]:
    """Sorted outcomes of ``racers`` processes taking the lock at once (each holds what it won until all tried)."""
    start, done, results = context.Barrier(racers), context.Event(), context.Queue()
    processes = [context.Process(target=try_lock, args=(workdir, start, done, results, job_id))
                 for _ in range(racers)]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=20) for _ in processes)
    done.set()
    for process in processes:
        process.join(10)
        assert process.exitcode == 0
    return outcomes


def try_lock(workdir, start, done, results, job_id=None):
    start.wait(10)
    try:
        lock = WorkdirLock(workdir, job_id=job_id).acquire()
    except WorkdirBusyError:
        results.put("refused")
        return
    results.put("shared" if lock.shared else "won")
    done.wait(10)  # hold the lock until every racer has tried
    lock.release()


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # JAX's warning; the children use no JAX
@pytest.mark.parametrize("stale", [False, True], ids=["free", "held-by-a-dead-process"])
def test_racing_processes_exactly_one_wins(tmp_path, dead_pid, stale):
    context = multiprocessing.get_context("fork")  # the children need not import the package again
    for round_ in range(5):
        workdir = tmp_path / str(round_)
        workdir.mkdir()
        if stale:
            write_lock(workdir, pid=dead_pid)
        assert race(context, workdir) == ["refused", "refused", "refused", "won"]
        assert not (workdir / "lock.json").exists()


@pytest.mark.parametrize("method, call, before", [
    ("_read", 1, False),  # after the taker judged the lock stale, before it claims it
    ("_read", 2, False),  # after the taker, holding the claim, found the stale lock still in place
    ("_create", 2, True),  # after the taker removed the stale lock, before it writes its own
], ids=["before-the-claim", "inside-the-claim", "between-remove-and-create"])
def test_two_takers_of_one_stale_lock_cannot_both_win(tmp_path, dead_pid, monkeypatch, method, call, before):
    """``other`` tries to take the lock at one point of ``taker``'s takeover, its ``call``-th call of ``method``."""
    write_lock(tmp_path, pid=dead_pid)
    taker, other = WorkdirLock(tmp_path), WorkdirLock(tmp_path)
    original, calls, outcomes = getattr(taker, method), [], {}

    def let_other_try():
        calls.append(method)
        if before and len(calls) == call:
            outcomes["other"] = attempt(other)
        result = original()
        if not before and len(calls) == call:
            outcomes["other"] = attempt(other)
        return result

    monkeypatch.setattr(taker, method, let_other_try)
    outcomes["taker"] = attempt(taker)
    assert sorted(outcomes.values()) == ["refused", "won"]
    winner = taker if outcomes["taker"] == "won" else other
    assert lock_file(tmp_path)["token"] == winner.record["token"]
    winner.release()


def attempt(lock: WorkdirLock) -> str:
    try:
        lock.acquire()
    except WorkdirBusyError:
        return "refused"
    return "won"


def small_config() -> ConfigDict:
    """A config shaped like a training one: sections, a field named "model" outside config.model, tuples."""
    return ConfigDict(dict(
        seed=0,
        model=dict(block_out_channels=(16, 24, 32), layers_per_block=1),
        data=dict(name="mnist", image_size=16, channels=1, random_flip=True),
        train=dict(batch_size=8, num_steps=40, log_every=5),
        optim=dict(lr=1e-3),
        eval=dict(num_images=16),
        evaluate=dict(model="", metrics=("fid", "fd_mnist")),
        mesh=dict(fsdp=False),
    ))


@pytest.fixture
def stored() -> dict:
    """As the workdir's config.json holds it: tuples became lists."""
    return json.loads(small_config().to_json())


def test_a_model_change_is_refused_naming_field_and_both_values(stored):
    new = copy.deepcopy(stored)
    new["model"]["block_out_channels"] = [16, 24, 40]
    new["seed"] = 1
    new["optim"]["lr"] = 5e-4
    with pytest.raises(ConfigDriftError) as refusal:
        check_config_drift(stored, new)
    message = str(refusal.value)
    assert isinstance(refusal.value, ConfigError)
    assert "model.block_out_channels: (16, 24, 32) in the workdir -> (16, 24, 40) now" in message
    assert "seed: 0 in the workdir -> 1 now" in message
    assert "optim.lr" not in message and "new --workdir" in message


def test_a_learning_rate_or_length_change_is_returned_and_recorded(tmp_path, stored):
    new = copy.deepcopy(stored)
    new["optim"]["lr"] = 5e-4
    new["train"]["num_steps"] = 80
    new["evaluate"]["model"] = "elsewhere"  # not under "model"
    changes = check_config_drift(stored, new)
    assert changes == [Change("evaluate.model", "", "elsewhere"), Change("optim.lr", 1e-3, 5e-4),
                       Change("train.num_steps", 40, 80)]
    record_config(tmp_path, new, changes)
    record_config(tmp_path, new, [])
    lines = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert [line["changes"] for line in lines] == [[
        {"field": "evaluate.model", "old": "", "new": "elsewhere"},
        {"field": "optim.lr", "old": 1e-3, "new": 5e-4},
        {"field": "train.num_steps", "old": 40, "new": 80}], []]
    assert lines[0]["host"] == HOST and datetime.datetime.fromisoformat(lines[0]["time"]).tzinfo is not None
    assert json.loads((tmp_path / "config.json").read_text()) == new


def test_rematerialisation_may_change_and_lora_may_not(stored):
    """model.remat changes how a step is computed, not what the checkpoint holds; a LoRA field changes the
    parameter tree."""
    new = copy.deepcopy(stored)
    new["model"]["remat"] = True
    assert check_config_drift(stored, new) == [Change("model.remat", ABSENT, True)]
    finetuning = {**stored, "deme": {"lora": False, "lora_rank": 4}}
    for field, value in (("lora", True), ("lora_rank", 8)):
        changed = copy.deepcopy(finetuning)
        changed["deme"][field] = value
        with pytest.raises(ConfigDriftError, match=rf"deme\.{field}: "):
            check_config_drift(finetuning, changed)


def test_lists_and_tuples_with_equal_items_are_equal(stored):
    as_tuples = small_config().to_dict()
    assert isinstance(as_tuples["model"]["block_out_channels"], tuple)
    assert check_config_drift(stored, as_tuples) == []
    as_tuples["evaluate"]["metrics"] = ("fid",)
    assert check_config_drift(stored, as_tuples) == [Change("evaluate.metrics", ["fid", "fd_mnist"], ("fid",))]


def test_added_and_removed_fields_are_changes(stored):
    new = copy.deepcopy(stored)
    new["optim"]["warmup_steps"] = 100
    del new["eval"]["num_images"]
    assert check_config_drift(stored, new) == [Change("eval.num_images", 16, ABSENT),
                                               Change("optim.warmup_steps", ABSENT, 100)]
    assert str(Change("optim.warmup_steps", ABSENT, 100)) == "optim.warmup_steps: absent in the workdir -> 100 now"
    del new["data"]["channels"]
    new["deme"] = {"num_replicas": 4, "global_prob": 0.3}
    with pytest.raises(ConfigDriftError) as refusal:
        check_config_drift(stored, new)
    message = str(refusal.value)
    assert "data.channels: 1 in the workdir -> absent now" in message
    assert "deme.num_replicas: absent in the workdir -> 4 now" in message and "global_prob" not in message
