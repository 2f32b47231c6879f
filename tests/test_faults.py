"""Ordinary mistakes and faults on a workdir: a second run, a changed config, a damaged checkpoint, a full disk,
kills at any moment. Each ends in one clear message (exit code 2, no traceback) or in an exact resume, and none
spoils what was saved."""

import hashlib
import json
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from deme_jax.train import ConfigError, train_and_evaluate
from deme_jax.train.workdir import WorkdirBusyError
from deme_jax.interop import save_orbax_model
from deme_jax.models import init_params
from deme_jax.train.checkpoints import CheckpointMismatchError, Checkpoints, DamagedCheckpointError
from tests import tiny_config
from tests.runs import CONFIG, ROOT, assert_trees_equal, deme, final_params
from tests.test_finetune import PRETRAINED


def run(*args: str) -> subprocess.CompletedProcess:
    """The real `deme` command, waited for."""
    return subprocess.run([sys.executable, "-m", "deme_jax.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def pretrain(workdir, *overrides: str) -> list[str]:
    return ["pretrain", f"--config={CONFIG}", f"--workdir={workdir}", *overrides]


def contents(workdir: Path) -> dict[str, str]:
    """Every file under ``workdir`` and a hash of its bytes: equal before and after means left as it was."""
    return {p.relative_to(workdir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(workdir.rglob("*")) if p.is_file()}


def assert_one_clear_line(proc: subprocess.CompletedProcess, *expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    for text in expected:
        assert text in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("deme "), proc.stderr[-3000:]  # the message ends it


def small_config(**train):
    config = tiny_config.get_config()
    config.train.update({**dict(num_steps=2, checkpoint_every=2, eval_every=0, sample_every=0), **train})
    return config


@pytest.mark.slow  # through the shell; tests/test_workdir.py checks refusal and take-over by default
def test_a_second_run_on_a_held_workdir_is_refused_at_once(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from deme_jax.train.workdir import WorkdirLock; "
                               "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
         str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = contents(tmp_path)
        second = run(*pretrain(tmp_path, "--config.train.num_steps=2"))
        assert_one_clear_line(second, "is in use by the run on", f"host {socket.gethostname()}", f"pid {holder.pid}",
                              "started 20")
        assert "Compiling" not in second.stderr  # refused before any work
        assert contents(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (its process died without releasing): the next run takes the lock over
    third = run(*pretrain(tmp_path, "--config.train.num_steps=2", "--config.train.eval_every=0",
                          "--config.train.sample_every=0"))
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"Took over --workdir={tmp_path} from a run that is gone" in third.stderr
    assert not (tmp_path / "lock.json").exists() and final_params(tmp_path)[0] == 2


@pytest.mark.slow  # 27 s; refusal through the shell and the drift check itself run by default
def test_a_restart_that_changes_the_model_is_refused_before_compiling(tmp_path):
    train_and_evaluate(small_config(), tmp_path)
    before = contents(tmp_path)
    changed = small_config()
    changed.model.block_out_channels = (16, 40)
    with pytest.raises(ConfigError, match=r"model\.block_out_channels: \(16, 32\) in the workdir -> \(16, 40\) now"
                                          r".*Use a new --workdir"):
        train_and_evaluate(changed, tmp_path)
    assert contents(tmp_path) == before
    # what the checkpoint can hold continues, and the change is recorded
    longer = small_config(num_steps=4)
    longer.optim.lr = 5e-4
    assert int(train_and_evaluate(longer, tmp_path).step) == 4
    history = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and history[0]["changes"] == []
    assert {c["field"]: (c["old"], c["new"]) for c in history[1]["changes"]} == {
        "optim.lr": (1e-3, 5e-4), "train.num_steps": (2, 4)}
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 5e-4


def test_a_changed_model_from_the_shell_is_one_line(tmp_path):
    train_and_evaluate(small_config(), tmp_path)
    refused = run(*pretrain(tmp_path, "--config.train.num_steps=2", "--config.model.block_out_channels=(16,40)"))
    assert_one_clear_line(refused, "deme pretrain: The config changes what the checkpoint", "block_out_channels")


def damage(directory: Path, how: str) -> Path:
    """Cuts the largest file of a checkpoint short, or flips one byte in its middle."""
    target = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    if how == "truncated":
        target.write_bytes(data[:len(data) // 2])
    else:
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(data)
    return target


@pytest.mark.slow  # two runs through the shell; test_when_no_checkpoint_reads... checks the checksums by default
@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(uninterrupted, tmp_path, how):
    first = run(*pretrain(tmp_path, "--config.train.num_steps=8"))
    assert first.returncode == 0, first.stderr[-3000:]
    damaged = damage(tmp_path / "checkpoints" / "8", how)
    second = run(*pretrain(tmp_path))  # on to the 40 steps of the uninterrupted run
    assert second.returncode == 0, second.stderr[-3000:]
    assert "The checkpoint of step 8" in second.stderr and "is damaged" in second.stderr
    assert "Resumed from the checkpoint at step 4" in second.stderr
    kept = list((tmp_path / "damaged_checkpoints").glob("8-*"))  # moved aside, never deleted
    assert len(kept) == 1 and (kept[0] / damaged.relative_to(tmp_path / "checkpoints" / "8")).is_file()
    assert_trees_equal(final_params(tmp_path)[1], final_params(uninterrupted)[1])


def test_when_no_checkpoint_reads_the_error_names_the_workdir(tmp_path):
    train_and_evaluate(small_config(num_steps=4), tmp_path)
    for step in (2, 4):
        damage(tmp_path / "checkpoints" / str(step), "flipped")
    with pytest.raises(DamagedCheckpointError, match=rf"no checkpoint in {tmp_path}/checkpoints reads completely"):
        train_and_evaluate(small_config(num_steps=6), tmp_path)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "damaged_checkpoints").iterdir()) == ["2", "4"]


def test_a_run_whose_workdir_another_run_took_over_stops_before_its_next_save(tmp_path, monkeypatch):
    """If a run's heartbeat stalled long enough for another run to take the workdir over, the first run must not
    go on writing checkpoints beside the new holder's: its next save is refused and the new lock kept."""
    import functools
    import threading

    from deme_jax.train import workdir as workdir_module

    monkeypatch.setattr(workdir_module.WorkdirLock, "__init__", functools.partialmethod(
        workdir_module.WorkdirLock.__init__, heartbeat_every_s=0.05))
    config = small_config(num_steps=300)  # ends the test if the run never notices (about 2 steps in)
    theirs = {"host": "another-host", "pid": 1, "start_time": "now", "start_unix": 0.0, "job_id": None,
              "token": "the run that took over"}

    def take_over_after_the_first_save():
        while not (tmp_path / "checkpoints" / "2").is_dir():
            time.sleep(0.02)
        (tmp_path / "lock.json").write_text(json.dumps(theirs))

    threading.Thread(target=take_over_after_the_first_save, daemon=True).start()
    with pytest.raises(WorkdirBusyError, match=r"Another run took --workdir=.* over while this one ran.*stops "
                                               r"without saving step \d+"):
        train_and_evaluate(config, tmp_path)
    assert json.loads((tmp_path / "lock.json").read_text()) == theirs


def restore_with(workdir: Path, abstract):
    checkpoints = Checkpoints(workdir, keep=3, asynchronous=False)
    try:
        return checkpoints.restore_latest(abstract)
    finally:
        checkpoints.close()


def test_a_whole_checkpoint_of_another_state_is_refused_and_kept(tmp_path):
    """A checkpoint that reads but holds other arrays (another model, optimizer or LoRA layout than the config's:
    the config check catches the fields it knows of) names the differences and moves nothing aside."""
    state = train_and_evaluate(small_config(num_steps=4), tmp_path)
    before = contents(tmp_path)
    abstract = jax.eval_shape(lambda: state)
    wider = abstract.replace(params={**abstract.params, "lora": jax.ShapeDtypeStruct((4, 2), jax.numpy.float32)})
    with pytest.raises(CheckpointMismatchError, match=r"step 4 .* holds another state .*params/lora is not in the "
                                                      r"checkpoint.*left as it is"):
        restore_with(tmp_path, wider)
    kernel = abstract.params["conv_in"]["kernel"]
    reshaped = abstract.replace(params={**abstract.params, "conv_in": {
        **abstract.params["conv_in"], "kernel": jax.ShapeDtypeStruct((1, 1, *kernel.shape[2:]), kernel.dtype)}})
    with pytest.raises(CheckpointMismatchError, match=r"params/conv_in/kernel is \(3, 3, 1, 16\) float32 in the "
                                                      r"checkpoint, \(1, 1, 1, 16\) float32 now"):
        restore_with(tmp_path, reshaped)
    assert contents(tmp_path) == before and not (tmp_path / "damaged_checkpoints").exists()
    assert restore_with(tmp_path, abstract)[2] == 4


def test_unreadable_checksums_leave_the_checkpoint_to_be_read_whole(tmp_path):
    """A checksum file cut short (by a full disk, before it was written atomically) does not condemn a whole
    checkpoint: it is read, and restored when it reads."""
    state = train_and_evaluate(small_config(num_steps=4), tmp_path)
    checksums = tmp_path / "checkpoints" / "4" / "checksums.json"
    checksums.write_text(checksums.read_text()[:10])
    restored, data_state, step = restore_with(tmp_path, jax.eval_shape(lambda: state))
    assert step == 4 and data_state == {"step": 4} and not (tmp_path / "damaged_checkpoints").exists()
    assert_trees_equal(restored.params, state.params)
    assert not list((tmp_path / "checkpoints").rglob("*.partial"))


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs: room for the tiny run's first checkpoints (3.4 MiB each), not for all of them."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_and_a_restart_with_space_continues(uninterrupted, small_disk, tmp_path):
    workdir = small_disk / "run"
    full = run(*pretrain(workdir, "--config.train.sample_every=0"))
    assert_one_clear_line(full, f"deme pretrain: {workdir} ran out of disk space", "MiB free", "is intact")
    kept, _ = final_params(workdir)
    assert 4 <= kept < 40
    moved = tmp_path / "run"  # the same workdir on a disk with space
    shutil.copytree(workdir, moved)
    done = run(*pretrain(moved))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_trees_equal(final_params(moved)[1], final_params(uninterrupted)[1])


def kill_when(process: subprocess.Popen, log: Path, ready, delay: float, timeout: float = 300) -> None:
    """SIGKILL ``process`` ``delay`` seconds after ``ready(log text)`` first holds."""
    deadline = time.time() + timeout
    while not ready(log.read_text() if log.exists() else ""):
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "the moment to kill never came"
        time.sleep(0.005)
    time.sleep(delay)
    assert process.poll() is None, "the run ended before the kill"
    process.kill()
    process.wait()


def saving(workdir: Path) -> bool:
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(".orbax-checkpoint-tmp" in p.name for p in directory.iterdir())


def finished_steps(workdir: Path) -> set[int]:
    directory = workdir / "checkpoints"
    return {int(p.name) for p in directory.iterdir() if p.name.isdigit()} if directory.is_dir() else set()


MOMENTS = ("during compilation", "mid-step", "mid-save", "mid-evaluation", "right after a save")


def soak(args: list[str], workdir: Path, seed: int, step_delay: float) -> None:
    """Kills the run at each of MOMENTS (random delays where a moment lasts), restarting it each time, and then
    lets it finish."""
    rng = random.Random(seed)
    for k, moment in enumerate(MOMENTS):
        before = finished_steps(workdir)
        ready = {
            "during compilation": lambda text: "Compiling the train step" in text,
            "mid-step": lambda text: "Compiled the train step" in text,
            "mid-save": lambda text: saving(workdir),
            "mid-evaluation": lambda text: "Held-out loss of the EMA weights" in text,
            "right after a save": lambda text: bool(finished_steps(workdir) - before),
        }[moment]
        delay = {"during compilation": rng.uniform(0.0, 0.5), "mid-step": rng.uniform(0.0, step_delay)}.get(moment, 0)
        log = workdir.parent / f"{workdir.name}-{k}.log"
        kill_when(deme(args, log=log), log, ready, delay)
    final = deme(args)
    out = final.communicate(timeout=600)[0]
    assert final.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_kills_at_five_moments_leave_pretraining_bit_identical(uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    soak(pretrain(workdir), workdir, seed=0, step_delay=2.0)
    assert_trees_equal(final_params(workdir)[1], final_params(uninterrupted)[1])


def raw_state(workdir: Path) -> dict:
    """Parameters and EMA parameters of the newest checkpoint, as saved."""
    checkpoints = Checkpoints(workdir, keep=3, asynchronous=False)
    state = checkpoints.restore_as_saved(checkpoints.latest_step())
    checkpoints.close()
    return {"params": state["params"], "ema_params": state["ema_params"]}


@pytest.mark.slow
def test_kills_at_five_moments_leave_stacked_finetuning_bit_identical(tmp_path):
    pretrained = save_orbax_model(PRETRAINED, init_params(PRETRAINED, jax.random.key(0)), tmp_path / "pretrained")
    finetune = lambda workdir: [  # noqa: E731
        "finetune", f"--config={ROOT / 'configs' / 'mnist_deme.py'}", f"--workdir={workdir}",
        f"--config.deme.pretrained={pretrained}", "--config.deme.num_replicas=2", "--config.data.image_size=8",
        "--config.train.batch_size=4", "--config.train.num_steps=400", "--config.train.log_every=20",
        "--config.train.checkpoint_every=50", "--config.train.eval_every=100", "--config.eval.num_images=8"]
    reference = run(*finetune(tmp_path / "uninterrupted"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    workdir = tmp_path / "run"
    soak(finetune(workdir), workdir, seed=1, step_delay=0.5)
    expected, got = raw_state(tmp_path / "uninterrupted"), raw_state(workdir)
    assert_trees_equal(got, expected)
