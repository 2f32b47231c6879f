"""The training engine: EMA and schedule arithmetic, exact resume, preemption, devices, processes, bad input."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from deme_jax.cli import PREEMPTED_EXIT_CODE
from deme_jax.train import ConfigError, NonFiniteLossError, Preempted, train_and_evaluate
from deme_jax.train.state import ema_decay, ema_update, learning_rate_schedule
from tests import tiny_config
from tests.metrics_util import read_scalars
from tests.runs import CONFIG, ROOT, assert_trees_equal, deme, final_params

def test_ema_decay_by_hand():
    ema = ConfigDict(dict(max_decay=0.9999, inv_gamma=1.0, power=0.75))
    for step in (0, 1, 10, 10_000_000):
        expected = min(0.9999, 1 - (1 + step) ** -0.75)
        assert float(ema_decay(jnp.int32(step), ema)) == pytest.approx(expected, rel=1e-6)
    assert float(ema_decay(jnp.int32(0), ema)) == 0.0  # the first update copies the parameters
    new = ema_update({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 2.0])}, jnp.float32(0.75))
    np.testing.assert_allclose(new["w"], [1.5, 2.0])


def test_learning_rate_warmup_then_cosine():
    optim = ConfigDict(dict(lr=1.0, schedule="cosine", warmup_steps=10, decay_steps=110, final_lr_fraction=0.1))
    lr = learning_rate_schedule(optim)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
    assert float(lr(110)) == pytest.approx(0.1, rel=1e-5)


def test_run_writes_checkpoints_metrics_and_samples(uninterrupted):
    workdir = uninterrupted
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == list(range(4, 41, 4))
    assert json.loads((workdir / "config.json").read_text())["train"]["num_steps"] == 40
    assert sorted(p.name for p in (workdir / "samples").iterdir()) == ["step_0000020.png", "step_0000040.png"]
    assert list(workdir.glob("events.out.tfevents.*"))


def wait_for_checkpoint(workdir: Path, step: int, process, timeout=180):
    deadline = time.time() + timeout
    while not (workdir / "checkpoints" / str(step)).is_dir():
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_save_killed_half_way_leaves_the_last_good_checkpoint(uninterrupted, tmp_path):
    """SIGKILL while orbax writes a checkpoint's temporary directory; the restart ignores it and
    still ends bit-identical to the uninterrupted run."""
    args = ["pretrain", f"--config={CONFIG}", f"--workdir={tmp_path}"]
    first = deme(args)
    wait_for_checkpoint(tmp_path, 4, first)
    deadline = time.time() + 120
    while not any(".orbax-checkpoint-tmp" in p.name for p in (tmp_path / "checkpoints").iterdir()):
        assert first.poll() is None and time.time() < deadline, "no save in progress was seen"
        time.sleep(0.002)
    first.kill()
    first.communicate(timeout=60)
    assert any(".orbax-checkpoint-tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())
    second = deme(args)
    out = second.communicate(timeout=300)[0]
    assert second.returncode == 0, out
    assert_trees_equal(final_params(tmp_path)[1], final_params(uninterrupted)[1])


def test_sigterm_saves_then_raises_preempted_and_the_same_call_continues(tmp_path):
    """SIGTERM mid-run: the step in progress is saved and ``Preempted`` raised (so a caller such as sequential
    finetuning or the demo does not go on as if the run had finished); calling again continues from that step."""
    config = tiny_config.get_config()
    config.train.update(dict(num_steps=100_000, checkpoint_every=2, eval_every=0, sample_every=0, log_every=1))

    def terminate_after_the_first_save():
        deadline = time.time() + 300
        while not (tmp_path / "checkpoints" / "2").is_dir() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_after_the_first_save, daemon=True).start()
    with pytest.raises(Preempted, match=r"stopped by SIGTERM after saving step \d+ of 100000 in .*checkpoints; run "
                                        r"the same command to continue"):
        train_and_evaluate(config, tmp_path)
    stopped, _ = final_params(tmp_path)
    assert 2 <= stopped < 100_000
    config.train.num_steps = stopped + 2
    assert int(train_and_evaluate(config, tmp_path).step) == stopped + 2


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["sigkill", "sigterm"])
def test_interrupted_run_resumes_bit_identically(uninterrupted, tmp_path, sig):
    """A run stopped part-way and started again ends with the uninterrupted run's parameters, bit for bit."""
    args = ["pretrain", f"--config={CONFIG}", f"--workdir={tmp_path}"]
    first = deme(args)
    wait_for_checkpoint(tmp_path, 4, first)
    first.send_signal(sig)
    out = first.communicate(timeout=120)[0]
    if sig == signal.SIGKILL:
        assert first.returncode == -signal.SIGKILL
    else:  # saved, then ended as unfinished, so that a job script does not carry on
        assert first.returncode == PREEMPTED_EXIT_CODE, out
        assert "stopped by SIGTERM after saving step" in out
        stopped_at, _ = final_params(tmp_path)
        assert 4 <= stopped_at < 40
    second = deme(args)
    out = second.communicate(timeout=300)[0]
    assert second.returncode == 0, out
    step, params = final_params(tmp_path)
    assert step == 40
    assert_trees_equal(params, final_params(uninterrupted)[1])


@pytest.mark.slow
def test_eight_devices_give_the_losses_of_one(tmp_path):
    script = (
        "import json, sys; from deme_jax.train import train_and_evaluate; from tests import tiny_config\n"
        "import jax; c = tiny_config.get_config(); c.train.num_steps = 4; c.train.log_every = 1\n"
        "c.train.eval_every = 0; c.train.sample_every = 4; c.mesh.fsdp = sys.argv[2] == 'fsdp'\n"
        "train_and_evaluate(c, sys.argv[1])\n"
        "print(json.dumps({'devices': jax.device_count()}))"
    )
    results = {}
    for name, flags, mode in (("one", "", "dp"), ("eight", "--xla_force_host_platform_device_count=8", "dp"),
                              ("eight_fsdp", "--xla_force_host_platform_device_count=8", "fsdp")):
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / name), mode], cwd=ROOT,
                              env={**os.environ, "XLA_FLAGS": flags}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[name]["loss"] = list(read_scalars(tmp_path / name)["train/loss"].values())
        results[name]["grid"] = np.asarray(Image.open(tmp_path / name / "samples" / "step_0000004.png"), float)
    assert results["one"]["devices"] == 1 and results["eight"]["devices"] == 8
    flat = lambda name: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(
        final_params(tmp_path / name)[1])])
    for other in ("eight", "eight_fsdp"):
        np.testing.assert_allclose(results[other]["loss"], results["one"]["loss"], rtol=1e-5)
        ours, expected = flat(other), flat("one")  # every parameter and EMA weight
        assert np.linalg.norm(ours - expected) / np.linalg.norm(expected) < 1e-5
        assert np.abs(results[other]["grid"] - results["one"]["grid"]).max() <= 1  # uint8 rounding


@pytest.mark.slow
def test_two_processes_match_one(uninterrupted, tmp_path):
    """Two processes on localhost (one CPU device each, gloo), started by launch/local.sh, compute the
    one-process run."""
    launcher = subprocess.Popen(
        ["bash", str(ROOT / "launch" / "local.sh"), "2", sys.executable, "-m", "deme_jax.cli", "pretrain",
         f"--config={CONFIG}", f"--workdir={tmp_path / 'run'}"],
        cwd=ROOT, env={**os.environ, "DEME_LOG_DIR": str(tmp_path)})  # logs in files: a full pipe blocks
    try:
        launcher.wait(timeout=420)  # collectives can hang: a hard limit
    finally:
        launcher.terminate()
    logs = [(tmp_path / f"process_{i}.log").read_text() for i in range(2)]
    assert launcher.returncode == 0, logs[0][-3000:] + logs[1][-3000:]
    assert all("Connecting to JAX distributed service" in log for log in logs)
    run = tmp_path / "run"
    step, params = final_params(run)
    assert step == 40
    np.testing.assert_allclose(list(read_scalars(run)["train/loss"].values()),
                               list(read_scalars(uninterrupted)["train/loss"].values()),
                               rtol=1e-5)
    # The all-reduce sums gradients in another order, so the runs differ by float rounding. Adam turns the
    # rounding noise of gradients that are exactly zero in theory (attention key biases, which softmax
    # ignores) into lr-sized steps, so those few leaves wander; the parameter vector as a whole agrees.
    flat = lambda tree: np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(tree)])
    ours, expected = flat(params), flat(final_params(uninterrupted)[1])
    assert np.linalg.norm(ours - expected) / np.linalg.norm(expected) < 1e-4


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters(tmp_path):
    config = tiny_config.get_config()
    config.model.dtype = "bfloat16"
    config.train.update(dict(num_steps=3, eval_every=0, sample_every=0))
    state = train_and_evaluate(config, tmp_path)
    leaves = jax.tree_util.tree_leaves((state.params, state.ema_params))
    assert all(x.dtype == jnp.float32 for x in leaves)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert np.isfinite(list(read_scalars(tmp_path)["train/loss"].values())).all()


@pytest.mark.parametrize("field,value,message", [
    ("data.name", "no_such_dataset", "no_such_dataset"),
    ("optim.lr", 0.0, r"config\.optim\.lr=0\.0 must be > 0"),
    ("train.batch_size", 0, r"config\.train\.batch_size=0 must be > 0"),
    ("model.norm_num_groups", 5, r"not divisible by norm_num_groups=5"),
    ("data.image_size", 28, r"config\.data\.image_size=28 differs from config\.model\.sample_size"),
    ("train.eval_every", -1, r"config\.train\.eval_every=-1 must be >= 0"),
    ("optim.decay_steps", 2, r"config\.optim\.decay_steps=2 must exceed warmup_steps=2"),
    ("optim.final_lr_fraction", 1.5, r"config\.optim\.final_lr_fraction=1\.5 must be in \[0, 1\]"),
    ("mesh.shape", {"replica": 2, "data": -1}, r"config\.mesh\.shape replica=2: pretraining trains one model"),
])
def test_bad_config_names_the_field(tmp_path, field, value, message):
    config = tiny_config.get_config()
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_unwritable_workdir(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"--workdir=.*a_file/run is not writable"):
        train_and_evaluate(tiny_config.get_config(), tmp_path / "a_file" / "run")


def test_a_url_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pathlib would make gs://bucket/run the local folder gs:/bucket/run
    with pytest.raises(ConfigError, match=r"--workdir=gs://bucket/run is a URL; .*mounted file system"):
        train_and_evaluate(tiny_config.get_config(), "gs://bucket/run")
    assert not list(tmp_path.iterdir())


def test_batch_not_divisible_by_devices(tmp_path):
    script = ("from deme_jax.train import train_and_evaluate; from tests import tiny_config\n"
              "c = tiny_config.get_config(); c.train.batch_size = 12; train_and_evaluate(c, '%s')" % tmp_path)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert "config.train.batch_size=12 is not divisible by the 8 devices" in proc.stderr


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config.get_config()
    config.train.update(dict(num_steps=4, checkpoint_every=2, eval_every=0, sample_every=0))
    train_and_evaluate(config, tmp_path)
    good_step, good = final_params(tmp_path)
    config.train.num_steps = 40
    config.optim.update(dict(lr=1e6, grad_clip=0.0, warmup_steps=0, schedule="constant"))  # diverges at once
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step \d+.*last good checkpoint \(step 4\)"):
        train_and_evaluate(config, tmp_path)
    step, params = final_params(tmp_path)
    assert step == good_step == 4
    assert_trees_equal(params, good)


@pytest.mark.parametrize("name", ["default", "mnist_tiny", "mnist16_pretrain", "cifar10_ddpm", "church_ddpm"])
def test_shipped_configs_are_valid(name, tmp_path):
    import importlib

    from deme_jax.train import validate_config

    validate_config(importlib.import_module(f"configs.{name}").get_config(), tmp_path)


def test_pretraining_on_an_image_folder_with_its_held_out_split(tmp_path):
    from tests.test_data import write_digits

    write_digits(tmp_path / "images", 60, size=32)
    config = tiny_config.get_config()
    config.data.update(dict(name="folder", folder=str(tmp_path / "images"), heldout_fraction=0.2, random_flip=False))
    config.train.update(dict(num_steps=2, checkpoint_every=2, eval_every=2, sample_every=0))
    config.eval.num_images = 500  # more than the folder holds out: refused before anything runs
    with pytest.raises(ValueError, match=r"asked for 500 held-out images of 'folder', which has \d+.*heldout_fraction"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    config.eval.num_images = 4
    assert int(train_and_evaluate(config, tmp_path / "run").step) == 2
    assert np.isfinite(read_scalars(tmp_path / "run")["heldout/loss"][2])
