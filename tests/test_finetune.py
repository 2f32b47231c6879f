"""`deme finetune` and `deme merge` end to end on a tiny pretrained model written to disk."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import deme as deme_config
from deme_jax.deme import TimestepEnsemble, finetune, load_replicas, merge_replicas
from deme_jax.deme.replicas import replica_slice, with_identity_projections
from deme_jax.interop import load_diffusers_unet, load_orbax_model, save_orbax_model
from deme_jax.merge import merge
from deme_jax.models import UNet2D, init_params
from deme_jax.train import ConfigError
from tests.metrics_util import read_scalars

ROOT = Path(__file__).resolve().parent.parent

# No attention: its key bias has a zero gradient, which Adam turns into lr-sized noise steps.
PRETRAINED = UNet2D(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                    layers_per_block=1, norm_num_groups=4)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return save_orbax_model(PRETRAINED, init_params(PRETRAINED, jax.random.key(0)),
                           tmp_path_factory.mktemp("pretrained") / "model")


def tiny_config(model_path, **deme):
    config = deme_config.get_config()
    config.deme.update({"pretrained": str(model_path), "num_replicas": 2, **deme})
    config.data.update(dict(name="mnist", image_size=8, channels=1, random_flip=False))
    config.train.update(dict(batch_size=4, num_steps=4, log_every=2, checkpoint_every=2, eval_every=4,
                             sample_every=4))
    config.optim.lr = 1e-3
    config.eval.num_images = 16
    config.sample.update(dict(num_images=2, ddim_steps=2))
    config.merge.update(dict(weight_values=(0.0, 1.0)))
    return config


def relative_l2(a, b):
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: jnp.sum((x - y) ** 2), a, b))
    norm = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x: jnp.sum(x ** 2), a))
    return float(np.sqrt(sum(leaves) / sum(norm)))


@pytest.fixture(scope="module")
def stacked_run(pretrained, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stacked")
    state = finetune(tiny_config(pretrained), workdir)
    return workdir, state


@pytest.mark.slow  # a second whole finetune run, 40 s
def test_stacked_and_sequential_modes_give_the_same_replicas(pretrained, stacked_run, tmp_path):
    workdir, stacked = stacked_run
    sequential = finetune(tiny_config(pretrained, mode="sequential"), tmp_path)
    assert int(stacked.step[0]) == 4 and len(sequential) == 2
    # vmap batches the convolutions differently, and Adam's first steps (about lr * sign(g)) turn float
    # noise in near-zero gradients into lr-sized steps: 1e-4 is 100x below how far two replicas differ.
    for i, one in enumerate(sequential):
        assert relative_l2(replica_slice(stacked.params, i), one.params) < 1e-4
        assert relative_l2(replica_slice(stacked.ema_params, i), one.ema_params) < 1e-4
    # the two replicas did train differently: their own intervals, data and noise
    assert relative_l2(sequential[0].params, sequential[1].params) > 1e-2
    # both layouts load as the same stacked EMA weights
    model_a, a, partition_a, _ = load_replicas(workdir)
    model_b, b, partition_b, _ = load_replicas(tmp_path)
    assert model_a == model_b and model_a.channel_projection
    np.testing.assert_array_equal(partition_a, [0, 500, 1000])
    np.testing.assert_array_equal(partition_a, partition_b)
    assert relative_l2(a, b) < 1e-4


@pytest.mark.slow
def test_replicas_sharded_over_eight_devices_match_one_device(pretrained, stacked_run, tmp_path):
    script = ("import json, sys, jax; from tests.test_finetune import tiny_config; from deme_jax.deme import finetune\n"
              "s = finetune(tiny_config(sys.argv[1]), sys.argv[2])\n"
              "print(json.dumps({'devices': jax.device_count(), 'mesh': dict(s.params['conv_in']['kernel'].sharding"
              ".mesh.shape), 'spec': str(s.params['conv_in']['kernel'].sharding.spec)}))")
    proc = subprocess.run([sys.executable, "-c", script, str(pretrained), str(tmp_path)], cwd=ROOT,
                          env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    layout = json.loads(proc.stdout.strip().splitlines()[-1])
    assert layout == {"devices": 8, "mesh": {"replica": 2, "data": 4}, "spec": "P('replica',)"}
    _, eight, _, _ = load_replicas(tmp_path)
    _, one, _, _ = load_replicas(stacked_run[0])
    assert relative_l2(one, eight) < 1e-4


def test_finetune_writes_per_replica_metrics_and_ensemble_samples(stacked_run):
    workdir, _ = stacked_run
    assert (workdir / "samples" / "step_0000004.png").is_file()
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["channel_projection"] is True and config["model"]["sample_size"] == 8
    scalars = read_scalars(workdir)
    for step in (2, 4):  # log_every=2: each replica's loss, and their mean as train/loss
        losses = [scalars[f"train/replica{i}/loss"][step] for i in range(2)]
        assert all(np.isfinite(losses)) and losses[0] != losses[1]
        assert scalars["train/loss"][step] == pytest.approx(np.mean(losses), rel=1e-6)
    for i in range(2):  # eval_every=4: each replica's EMA weights on the held-out digits, per equal interval
        heldout = [scalars[f"heldout/replica{i}/loss_t{a}-{a + 250}"][4] for a in range(0, 1000, 250)]
        assert all(np.isfinite(heldout))
        assert scalars[f"heldout/replica{i}/loss"][4] == pytest.approx(np.mean(heldout), rel=1e-5)


@pytest.mark.slow
def test_resumed_finetuning_continues_where_it_stopped(pretrained, stacked_run, tmp_path):
    config = tiny_config(pretrained)
    config.train.num_steps = 2
    finetune(config, tmp_path)
    resumed = finetune(tiny_config(pretrained), tmp_path)
    assert relative_l2(resumed.params, stacked_run[1].params) < 1e-6


def test_merge_searches_weights_and_exports_orbax_and_diffusers(pretrained, stacked_run):
    workdir, state = stacked_run
    result = merge_replicas(tiny_config(pretrained), workdir)
    assert len(result["candidates"]) == 4  # values (0, 1) for 2 replicas
    scores = {tuple(c["weights"]): c["score"] for c in result["candidates"]}
    assert scores[(0.0, 0.0)] == pytest.approx(1.0, rel=1e-6)  # zero weights give the pretrained model back
    assert result["score"] == min(scores.values())
    assert (workdir / "merge" / "search.png").is_file()

    model, merged = load_orbax_model(workdir / "merge" / "orbax")
    pretrained_model, pretrained_params = load_orbax_model(pretrained)
    base_model, base = with_identity_projections(pretrained_model, pretrained_params)
    assert model == base_model  # the pretrained structure plus the projections
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
    expected = merge(base, state.ema_params, jnp.asarray(result["weights"]))
    assert relative_l2(expected, merged) < 1e-6
    diffusers_model, diffusers_params = load_diffusers_unet(workdir / "merge" / "diffusers")
    assert diffusers_model == model
    jax.tree_util.tree_map(np.testing.assert_array_equal, diffusers_params, merged)

    with pytest.raises(FileExistsError, match="exists from an earlier merge"):
        merge_replicas(tiny_config(pretrained), workdir)


def test_ensemble_routes_each_timestep_to_its_replica(stacked_run):
    workdir, _ = stacked_run
    model, replicas, partition, _ = load_replicas(workdir)
    ensemble = TimestepEnsemble(model, tuple(int(b) for b in partition))
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    t = jnp.array([0, 499, 500, 999])
    out = ensemble.apply({"params": replicas}, x, t)
    for k, replica in enumerate([0, 0, 1, 1]):
        expected = model.apply({"params": replica_slice(replicas, replica)}, x, t)[k]
        np.testing.assert_allclose(out[k], expected, atol=1e-5)


@pytest.mark.parametrize("deme, message", [
    (dict(num_replicas=1001), r"num_intervals=1001 > num_timesteps=1000"),
    (dict(global_prob=1.5), r"config.deme.global_prob=1.5 must lie in \[0, 1\]"),
    (dict(partition="explicit", boundaries=(0, 400, 300, 1000)), r"config.deme .*boundaries"),
    (dict(partition="explicit", boundaries=(0, 400, 900)), r"config.deme .*boundaries"),
    (dict(mode="parallel"), r"config.deme.mode='parallel'"),
    (dict(pretrained="/no/such/model"), r"config.deme.pretrained='/no/such/model' does not exist"),
])
def test_bad_deme_config_names_the_field(pretrained, tmp_path, deme, message):
    with pytest.raises(ConfigError, match=message):
        finetune(tiny_config(pretrained, **deme), tmp_path)


def test_data_that_does_not_fit_the_pretrained_model(pretrained, tmp_path):
    config = tiny_config(pretrained)
    config.data.image_size = 16
    with pytest.raises(ConfigError, match=r"does not fit the pretrained model \(8x8, 1 channels\)"):
        finetune(config, tmp_path)


def test_merge_weights_of_the_wrong_length_and_other_architectures(pretrained, stacked_run, tmp_path):
    workdir, _ = stacked_run
    config = tiny_config(pretrained)
    config.merge.update(dict(search="none", weights=(0.5, 0.5, 0.5)))
    with pytest.raises(ConfigError, match=r"give one weight per replica \(2\)"):
        merge_replicas(config, workdir)
    config.merge.update(dict(weights=(0.5, 0.5), metric="clip_score"))  # a text-to-image metric
    with pytest.raises(ConfigError, match=r"metric='clip_score' does not score this model: use one of "
                                          r"\['heldout_loss', 'fd_mnist', 'fid'\]"):
        merge_replicas(config, workdir, tmp_path / "clip_merge")
    # replicas finetuned from another architecture than the pretrained model named now
    other = UNet2D(**{**{f: getattr(PRETRAINED, f) for f in ("sample_size", "in_channels", "out_channels",
                                                            "down_block_types", "up_block_types",
                                                            "layers_per_block", "norm_num_groups")},
                      "block_out_channels": (8, 8)})
    other_path = save_orbax_model(other, init_params(other, jax.random.key(1)), tmp_path / "other")
    run = json.loads((workdir / "config.json").read_text())
    run["deme"]["pretrained"] = str(other_path)
    moved = tmp_path / "run"
    moved.mkdir()
    (moved / "config.json").write_text(json.dumps(run))
    (moved / "checkpoints").symlink_to(workdir / "checkpoints")
    with pytest.raises(ValueError, match="do not have the structure of config.deme.pretrained"):
        merge_replicas(tiny_config(pretrained), moved)


@pytest.mark.parametrize("name, layout", [("cifar10_deme", "cifar10"), ("church_deme", "church"),
                                          ("bedroom_deme", "church"), ("mnist_deme", "mnist16")])
def test_shipped_deme_configs_are_valid(name, layout, pretrained, tmp_path):
    import importlib

    from configs import mnist16_pretrain
    from deme_jax.deme.finetune import partition_of, validate_deme_config, with_model
    from deme_jax.deme.merging import validate_merge_config
    from deme_jax.interop import model_from_config
    from deme_jax.interop.unet import DDPM_CIFAR10_CONFIG
    from deme_jax.diffusion import make_schedule
    from deme_jax.models import build_model
    from deme_jax.train import validate_config
    from tests.diffusers_util import LSUN_CONFIG

    config = importlib.import_module(f"configs.{name}").get_config()
    config.deme.pretrained = str(pretrained)  # checked to exist; the model below stands in for it
    validate_deme_config(config)
    model = {"cifar10": lambda: model_from_config(DDPM_CIFAR10_CONFIG),
             "church": lambda: model_from_config(LSUN_CONFIG),
             "mnist16": lambda: build_model(mnist16_pretrain.get_config().model)}[layout]()
    config = with_model(config, model.clone(channel_projection=config.deme.channel_projection))
    N = config.deme.num_replicas
    validate_config(config, tmp_path)
    np.testing.assert_array_equal(partition_of(config, make_schedule(**config.diffusion)),
                                  np.linspace(0, 1000, N + 1))
    validate_merge_config(config.merge, N)


@pytest.mark.slow
def test_deme_commands_from_the_shell(pretrained, tmp_path):
    overrides = [f"--config.deme.pretrained={pretrained}", "--config.data.image_size=8", "--config.train.batch_size=4",
                 "--config.train.num_steps=2", "--config.train.eval_every=0", "--config.eval.num_images=8",
                 "--config.deme.num_replicas=2", "--config.merge.weight_values=(0.0,1.0)"]
    run = lambda *args: subprocess.run([sys.executable, "-m", "deme_jax.cli", *args], cwd=ROOT, capture_output=True,
                                       text=True, timeout=600)
    config = f"--config={ROOT / 'configs' / 'mnist_deme.py'}"
    bad = run("finetune", config, f"--workdir={tmp_path / 'bad'}", *overrides, "--config.deme.global_prob=2.0")
    assert bad.returncode == 2 and "deme finetune: config.deme.global_prob=2.0 must lie in [0, 1]" in bad.stderr
    done = run("finetune", config, f"--workdir={tmp_path / 'run'}", *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = run("merge", config, f"--workdir={tmp_path / 'run'}", *overrides)
    assert merged.returncode == 0, merged.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "merge" / "result.json").read_text())
    assert len(result["candidates"]) == 4 and (tmp_path / "run" / "merge" / "diffusers" / "config.json").is_file()


@pytest.mark.slow  # 18 s; ANT-UW's loss is checked by hand by default in test_objective.py
def test_ant_uw_learns_its_log_variances_and_exports_without_them(pretrained, tmp_path):
    config = tiny_config(pretrained, num_replicas=1, weighting="uncertainty", uncertainty_tasks=4,
                         consistency_weight=0.0, channel_projection=False)
    state = finetune(config, tmp_path)
    log_variances = np.asarray(state.params["loss_params"]["log_variances"])
    assert log_variances.shape == (1, 4) and np.abs(log_variances).max() > 1e-4  # learnt, from zeros
    model, replicas, _, _ = load_replicas(tmp_path)
    assert "loss_params" not in replicas and not model.channel_projection
    assert jax.tree_util.tree_structure(replica_slice(replicas, 0)) == jax.tree_util.tree_structure(
        init_params(PRETRAINED, jax.random.key(0)))


def test_analyze_a_finetuning_workdir_along_its_task_vectors(pretrained, stacked_run):
    from deme_jax.commands.analyze import run as analyze

    workdir, _ = stacked_run
    config = tiny_config(pretrained)
    config.analyze.update(dict(num_images=8, num_batches=1, landscape_images=16, grid_size=3))
    summary = analyze(config, workdir)
    assert summary["directions"] == "task_vectors" and summary["boundaries"] == [0, 500, 1000]
    assert np.asarray(summary["gradient_cosine"]).shape == (2, 2)
    grid = np.load(workdir / "analysis" / "landscape.npz")["loss"]
    assert grid.shape == (3, 3, 3) and np.all(np.isfinite(grid))


def test_merge_scored_by_fd_mnist_of_samples(pretrained, stacked_run, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(stacked_run[0], workdir, ignore=shutil.ignore_patterns("merge", "analysis"))
    config = tiny_config(pretrained)
    config.merge.update(dict(metric="fd_mnist", search="coordinate", weight_values=(0.0, 1.0), init=0.0,
                             max_rounds=1))
    config.evaluate.update(dict(num_samples=16, batch_size=16, ddim_steps=2, num_reference=32))
    result = merge_replicas(config, workdir)
    assert result["metric"] == "fd_mnist" and result["candidates"][0]["weights"] == [0.0, 0.0]
    # the all-zero candidate is the pretrained model, sampled from the same noise
    assert result["candidates"][0]["score"] == pytest.approx(result["pretrained_score"], rel=1e-6)
    assert len(result["candidates"]) == 3  # coordinate descent: start, then each weight set to 1
