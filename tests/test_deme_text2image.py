"""DeMe for Stable Diffusion: the conditional replica step against a hand-built reference, and `deme finetune` /
`deme merge` end to end on a tiny random pipeline (stacked equals sequential, the merged directory loads in ours
and in diffusers)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from ml_collections import ConfigDict

from deme_jax.deme.intervals import interval_timesteps
from deme_jax.deme.replicas import interval_tasks, make_replica_step, task_slice, with_identity_projections
from deme_jax.diffusion import make_schedule
from deme_jax.models import UNet2DCondition, init_params
from deme_jax.train.state import create_train_state

pytestmark = pytest.mark.reference

UNET = UNet2DCondition(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=8,
                       attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
EMA = ConfigDict(dict(max_decay=0.999, inv_gamma=1.0, power=0.75))
SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)


def perturbed(params, seed: int, scale: float = 0.05):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("prediction_type", [pytest.param("epsilon", marks=pytest.mark.slow), "v_prediction"])
def test_conditional_step_equals_a_hand_built_reference(prediction_type):
    """Loss, teacher term and interval sampling of one replica's step, given latents and text states."""
    schedule = make_schedule(**SD_SCHEDULE, prediction_type=prediction_type)
    teacher_params = init_params(UNET, jax.random.key(0))
    student, student_params = with_identity_projections(UNET, teacher_params)
    student_params = perturbed(student_params, 1)  # the student differs from the teacher: the teacher term counts
    partition, replica, lam = np.array([0, 300, 1000]), 1, 0.7
    step = make_replica_step(student, UNET, schedule, optax.sgd(1.0), EMA, partition, global_prob=0.0,
                             consistency_weight=lam)
    task = task_slice(interval_tasks(partition, teacher_params), replica)
    state = create_train_state(student_params, optax.sgd(1.0), jax.random.key(2))
    rng = np.random.default_rng(3)
    batch = {"latents": rng.standard_normal((4, 8, 8, 4)).astype(np.float32),
             "text": rng.standard_normal((4, 5, 8)).astype(np.float32)}
    new_state, metrics = jax.jit(step)(state, batch, task)

    # by hand: the step's documented randomness, forward noising, target, and the two squared errors
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    key_t, key_noise, _ = jax.random.split(key, 3)
    t = interval_timesteps(key_t, 4, 300, 1000, 1000, 0.0)
    assert np.all((np.asarray(t) >= 300) & (np.asarray(t) < 1000))
    noise = np.asarray(jax.random.normal(key_noise, (4, 8, 8, 4)))
    abar = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None, None]
    x0 = batch["latents"].astype(np.float64)
    x_t = (np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise).astype(np.float32)
    target = noise if prediction_type == "epsilon" else np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0
    teacher_out = np.asarray(jax.jit(UNET.apply)({"params": teacher_params}, x_t, t, batch["text"]), np.float64)

    def loss(params):
        out = student.apply({"params": params}, x_t, t, batch["text"])
        mse = lambda a, b: jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
        return jnp.mean(mse(out, target.astype(np.float32)) + lam * mse(out, teacher_out.astype(np.float32)))

    expected_loss, expected_grads = jax.jit(jax.value_and_grad(loss))(student_params)
    assert float(metrics["loss"]) == pytest.approx(float(expected_loss), rel=1e-5)
    assert metrics["interval_count"].sum() == 4
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])  # noqa: E731
    grads = flat(student_params) - flat(new_state.params)  # SGD with learning rate 1
    expected = flat(expected_grads)
    assert np.linalg.norm(grads - expected) / np.linalg.norm(expected) <= 1e-5
    # the text states reach both networks: other text states give another loss
    other = dict(batch, text=batch["text"][::-1].copy())
    assert float(jax.jit(step)(state, other, task)[1]["loss"]) != pytest.approx(float(metrics["loss"]), rel=1e-4)


@pytest.mark.slow  # the end-to-end stacked test checks the same through `deme finetune`
def test_text_states_reach_every_replica_of_a_stacked_step():
    """Stacked replicas take their own slice of a pytree batch (latents and text states)."""
    from deme_jax.deme.replicas import init_replicas, map_over_replicas, replica_slice
    from deme_jax.train.sharding import make_mesh

    schedule = make_schedule(**SD_SCHEDULE)
    params = init_params(UNET, jax.random.key(0))
    partition = np.array([0, 500, 1000])
    step = make_replica_step(UNET, UNET, schedule, optax.sgd(1e-3), EMA, partition, global_prob=0.0)
    tasks = interval_tasks(partition, params)
    state = init_replicas(params, optax.sgd(1e-3), jax.random.split(jax.random.key(1), 2))
    rng = np.random.default_rng(2)
    batch = {"latents": rng.standard_normal((2, 2, 8, 8, 4)).astype(np.float32),
             "text": rng.standard_normal((2, 2, 5, 8)).astype(np.float32)}
    stacked = jax.jit(map_over_replicas(step, make_mesh({"replica": 0, "data": -1}, 2)))
    _, metrics = stacked(state, batch, tasks)
    for i in range(2):
        one = jax.jit(step)(replica_slice(state, i), replica_slice(batch, i), task_slice(tasks, i))[1]
        np.testing.assert_allclose(metrics["loss"][i], one["loss"], rtol=1e-6)


@pytest.mark.slow  # a minute on 2 cores; test_lora.py checks dense deltas by default
def test_lora_replica_starts_exactly_at_the_pretrained_model_and_merges_as_dense_replicas():
    from deme_jax.merge import merge, weight_groups
    from deme_jax.models import LoRAModel, apply_lora, init_lora, lora_targets, merged_adapters

    teacher_params = init_params(UNET, jax.random.key(0))
    student, student_params = with_identity_projections(UNET, teacher_params)
    adapters = init_lora(teacher_params, 2, jax.random.key(1), lora_targets(teacher_params, ("attention",)))
    projections = traverse_util.unflatten_dict({p: x for p, x in traverse_util.flatten_dict(student_params).items()
                                                if p not in traverse_util.flatten_dict(teacher_params)})
    assert projections  # the channel projections: the leaves LoRA replicas train in full
    lora = LoRAModel(student, 0.5)
    rng = np.random.default_rng(0)
    x, t, text = rng.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([10, 700]), \
        rng.standard_normal((2, 5, 8)).astype(np.float32)
    start = lora.apply({"params": {"lora": adapters, "full": projections}, "base": teacher_params}, x, t, text)
    np.testing.assert_array_equal(start, UNET.apply({"params": teacher_params}, x, t, text))

    # two trained replicas: merging their adapters equals merging their dense weights
    replicas = [{"lora": perturbed(adapters, seed), "full": perturbed(projections, seed + 10)} for seed in (2, 3)]
    dense = [lora.dense(r, teacher_params) for r in replicas]
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *dense)
    groups = weight_groups(student_params)
    stacked_adapters = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *(r["lora"] for r in replicas))
    stacked_full = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *(r["full"] for r in replicas))
    columns = [groups.index(g) for g in weight_groups(projections)]
    per_block = np.random.default_rng(4).uniform(0, 1, (2, len(groups))).astype(np.float32)
    for weights in (np.array([0.3, 0.9], np.float32), per_block):
        merged = merge(student_params, stacked, weights)
        # the adapters' rank-2r sum on the pretrained weights, with the projections merged as the dense merge does
        merged_full = merge(projections, stacked_full, weights if weights.ndim == 1 else weights[:, columns])
        with_projections = traverse_util.unflatten_dict({**traverse_util.flatten_dict(teacher_params),
                                                         **traverse_util.flatten_dict(merged_full)})
        as_lora = apply_lora(with_projections, merged_adapters(stacked_adapters, weights, groups), 0.5)
        assert relative_l2(as_lora, merged) <= 1e-6


# --- end to end: cache -> finetune (stacked, sequential) -> merge -> the merged pipeline in ours and diffusers ----


def sd_deme_config(sd_dir, folder, **deme):
    from deme_jax.defaults import deme_config

    config = deme_config()
    config.deme.update(dict(pretrained=str(sd_dir), num_replicas=2, **deme))
    config.data.update(dict(name="folder", folder=str(folder), image_size=16, heldout_fraction=0.3,
                            random_flip=False, caption_dropout=0.2))
    config.cache.update(dict(shard_size=4, batch_size=4))
    config.train.update(dict(batch_size=2, num_steps=2, log_every=1, checkpoint_every=2, eval_every=2,
                             sample_every=2))
    config.eval.num_images = 4
    config.sample.update(dict(num_images=2, ddim_steps=2))
    config.merge.weight_values = (0.0, 1.0)
    return config


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    """A tiny random pipeline, 16 caption pairs and their latent caches (training and held-out splits)."""
    from deme_jax.commands import cache_latents
    from tests.sd_util import tiny_pipeline
    from tests.test_latent_cache import write_pairs

    root = tmp_path_factory.mktemp("sd_deme")
    reference, sd_dir = tiny_pipeline(root / "sd")
    folder = write_pairs(root / "pairs", 16)
    config = sd_deme_config(sd_dir, folder)
    config.cache.dir = str(root / "cache")
    for split in ("train", "heldout"):
        config.data.split = split
        cache_latents.run(config, root / "work")
    return {"root": root, "sd_dir": sd_dir, "folder": folder, "reference": reference, "cache": root / "cache"}


def finetuned(sd_run, name, **deme):
    from deme_jax.deme import finetune

    config = sd_deme_config(sd_run["sd_dir"], sd_run["folder"], **deme)
    config.cache.dir = str(sd_run["cache"])
    finetune(config, sd_run["root"] / name)
    return config, sd_run["root"] / name


def relative_l2(a, b) -> float:
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])  # noqa: E731
    return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(b)))


@pytest.fixture(scope="module")
def sequential_dir(sd_run):
    return finetuned(sd_run, "sequential", mode="sequential")[1]


@pytest.mark.slow
def test_stacked_and_sequential_replicas_agree_and_merge_into_a_pipeline(sd_run, sequential_dir):
    from deme_jax.deme import load_replicas, merge_replicas
    from deme_jax.interop import load_stable_diffusion

    config, stacked_dir = finetuned(sd_run, "stacked")
    _, stacked, partition, _ = load_replicas(stacked_dir)
    _, sequential, _, _ = load_replicas(sequential_dir)
    assert relative_l2(stacked, sequential) < 1e-5
    assert relative_l2(jax.tree_util.tree_map(lambda x: x[0], stacked),
                       jax.tree_util.tree_map(lambda x: x[1], stacked)) > 1e-4  # replicas trained apart
    assert sorted(p.name for p in (stacked_dir / "samples").iterdir()) == ["step_0000002.png"]

    result = merge_replicas(config, stacked_dir)
    assert result["partition"] == [0, 500, 1000] and len(result["weights"]) == 2
    merged = load_stable_diffusion(stacked_dir / "merge" / "diffusers")
    assert merged.unet.channel_projection
    pretrained = load_stable_diffusion(sd_run["sd_dir"])
    for name in ("vae", "text_encoder"):  # the encoders are the pretrained pipeline's, bit for bit
        jax.tree_util.tree_map(np.testing.assert_array_equal, merged.params[name], pretrained.params[name])
    unet = traverse_util.flatten_dict(merged.params["unet"])
    assert any("channel_projection" in path for path in unet)


@pytest.mark.slow
def test_merged_pipeline_without_projections_generates_as_in_diffusers(sd_run):
    """Without channel projections the merged directory is a stock Stable Diffusion pipeline: diffusers and we
    generate the same images from it (as tests/test_text2image.py bounds, 1e-4)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from deme_jax import text2image
    from deme_jax.deme import merge_replicas
    from deme_jax.interop import load_stable_diffusion
    from tests.test_text2image import PROMPTS, diffusers_images, latents_for

    config, workdir = finetuned(sd_run, "no_projections", channel_projection=False)
    config.merge.update(dict(search="none", weights=(0.5, 0.5)))
    merge_replicas(config, workdir)
    path = workdir / "merge" / "diffusers"
    reference = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    ours = text2image.generate(load_stable_diffusion(path), PROMPTS, num_inference_steps=10, guidance_scale=7.5,
                               latents=latents_for(), scheduler="ddim")
    assert np.abs(ours - diffusers_images(reference, "ddim", latents_for())).max() <= 1e-4
    # and the merge moved the UNet away from the pretrained one
    pretrained = sd_run["reference"].unet.state_dict()
    merged = reference.unet.state_dict()
    assert any(not torch.equal(merged[k], pretrained[k]) for k in pretrained)


@pytest.mark.slow
def test_fsdp_replicas_split_over_devices_match_one_device(sd_run, sequential_dir, tmp_path):
    """config.mesh.fsdp: each replica's state and the teacher split over two devices, the same replicas."""
    import json
    import os
    import subprocess
    import sys

    from deme_jax.deme import load_replicas
    from tests.runs import ROOT

    script = ("import json, sys, jax; from tests.test_deme_text2image import sd_deme_config\n"
              "from deme_jax.deme import finetune\n"
              "c = sd_deme_config(sys.argv[1], sys.argv[2], mode='sequential'); c.cache.dir = sys.argv[3]\n"
              "c.mesh.fsdp = True\n"
              "s = finetune(c, sys.argv[4])[0]\n"
              "k = s.params['down_blocks_1']['resnets_0']['conv2']['kernel']\n"
              "print(json.dumps({'devices': jax.device_count(), 'spec': str(k.sharding.spec)}))")
    proc = subprocess.run([sys.executable, "-c", script, str(sd_run["sd_dir"]), str(sd_run["folder"]),
                           str(sd_run["cache"]), str(tmp_path)], cwd=ROOT,
                          env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    layout = json.loads(proc.stdout.strip().splitlines()[-1])
    assert layout["devices"] == 2 and "data" in layout["spec"]
    _, split, _, _ = load_replicas(tmp_path)
    _, one, _, _ = load_replicas(sequential_dir)
    assert relative_l2(split, one) < 1e-5


@pytest.mark.slow
def test_lora_replicas_train_only_adapters_and_export_a_lora_diffusers_loads(sd_run):
    """LoRA replicas without projections, stacked: the state holds adapters only; the merge (task arithmetic)
    exports a full pipeline and one LoRA file, which diffusers applies onto the pretrained pipeline to give the
    merged UNet."""
    import torch
    from diffusers import StableDiffusionPipeline

    from deme_jax.deme import merge_replicas

    from deme_jax.deme import load_replicas

    config, workdir = finetuned(sd_run, "lora", lora=True, lora_rank=2, channel_projection=False)

    _, replicas, _, _ = load_replicas(workdir)
    assert set(replicas) == {"lora", "full"} and not replicas["full"]
    config.merge.update(dict(search="none", weights=(0.7, 0.4)))
    result = merge_replicas(config, workdir)
    assert result["weights"] == pytest.approx([0.7, 0.4])
    merged = StableDiffusionPipeline.from_pretrained(workdir / "merge" / "diffusers", safety_checker=None)
    with_lora = StableDiffusionPipeline.from_pretrained(sd_run["sd_dir"], safety_checker=None)
    with_lora.load_lora_weights(workdir / "merge" / "lora")
    with_lora.fuse_lora()
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    text = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = merged.unet(x, t, text).sample, with_lora.unet(x, t, text).sample
        pretrained = sd_run["reference"].unet(x, t, text).sample
    assert float((got - expected).norm() / expected.norm()) <= 1e-5
    assert float((pretrained - expected).norm() / expected.norm()) > 1e-4  # the merge moved the UNet


@pytest.mark.parametrize("name", ["sd15_deme", "sd15_deme_lora"])
def test_shipped_stable_diffusion_configs_are_valid(name, tmp_path):
    import importlib

    from deme_jax.deme.finetune import partition_of, validate_deme_config, with_model
    from deme_jax.deme.merging import validate_merge_config
    from deme_jax.interop.unet_condition import SD15_CONFIG, model_from_config
    from deme_jax.train import validate_config

    config = importlib.import_module(f"configs.{name}").get_config()
    config.deme.pretrained = str(tmp_path)  # checked to exist; SD 1.5's UNet stands in for its pipeline
    validate_deme_config(config)
    unet = model_from_config(SD15_CONFIG).clone(channel_projection=True, dtype=jnp.bfloat16, remat=True)
    config = with_model(config, unet)
    validate_config(config, tmp_path)
    np.testing.assert_array_equal(partition_of(config, make_schedule(**config.diffusion)), [0, 250, 500, 750, 1000])
    validate_merge_config(config.merge, config.deme.num_replicas)
    assert config.train.batch_size == 256 and config.deme.lora == (name == "sd15_deme_lora")
    assert config.data.image_size == SD15_CONFIG["sample_size"] * 8
    from deme_jax.metrics.scoring import TEXT_TO_IMAGE_METRICS
    from deme_jax.text2image import SCHEDULERS

    evaluate = config.evaluate  # what the COCO-protocol scorer accepts
    assert set(evaluate.metrics) <= set(TEXT_TO_IMAGE_METRICS) and evaluate.sampler in SCHEDULERS


@pytest.fixture(scope="module")
def unet_params():
    return init_params(UNET, jax.random.key(0))


@pytest.mark.parametrize("deme, message", [
    (dict(lora_rank=0), r"config.deme.lora_rank=0: the LoRA rank must be a positive integer"),
    (dict(lora_targets=("projection",)), r"config.deme.lora_targets=\('projection',\): choose from"),
    (dict(lora_rank=9), r"rank=9 exceeds the kernel"),  # the tiny UNet's narrowest attention projection
])
def test_bad_lora_settings_name_the_field(deme, message, unet_params):
    from deme_jax.defaults import deme_config
    from deme_jax.deme.finetune import lora_student
    from deme_jax.train import ConfigError

    config = deme_config()
    config.deme.update(dict(lora=True, **deme))
    params = unet_params
    with pytest.raises(ConfigError, match=message):
        lora_student(config, UNET, params, params)


def test_a_missing_heldout_cache_names_the_command_that_makes_it(tmp_path):
    from deme_jax.defaults import deme_config
    from deme_jax.deme.data import heldout_batch
    from deme_jax.train import ConfigError

    config = deme_config()
    with pytest.raises(ConfigError, match=r"No latent cache of split 'heldout' at .*latent_cache/heldout: run `deme "
                                          r"cache-latents .* --config.data.split=heldout` first"):
        heldout_batch(config, tmp_path, 8, fingerprint="0123456789abcdef")


@pytest.mark.slow
def test_kills_at_five_moments_leave_stable_diffusion_finetuning_bit_identical(sd_run, tmp_path):
    """`deme finetune` of SD replicas (stacked, from the latent caches) killed with SIGKILL while compiling,
    mid-step, mid-save, mid-evaluation and right after a save, restarted each time: the same weights as a run
    never interrupted."""
    from tests.runs import ROOT, assert_trees_equal
    from tests.test_faults import raw_state, run, soak

    def finetune(workdir):
        return ["finetune", f"--config={ROOT / 'configs' / 'deme.py'}", f"--workdir={workdir}",
                f"--config.deme.pretrained={sd_run['sd_dir']}", "--config.deme.num_replicas=2",
                "--config.data.name=folder", f"--config.data.folder={sd_run['folder']}", "--config.data.image_size=16",
                "--config.data.heldout_fraction=0.3", "--config.data.random_flip=False",
                f"--config.cache.dir={sd_run['cache']}", "--config.train.batch_size=2", "--config.train.num_steps=60",
                "--config.train.log_every=5", "--config.train.checkpoint_every=10", "--config.train.eval_every=20",
                "--config.train.sample_every=0", "--config.eval.num_images=4"]

    reference = run(*finetune(tmp_path / "uninterrupted"))
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    workdir = tmp_path / "run"
    soak(finetune(workdir), workdir, seed=2, step_delay=0.5)
    assert_trees_equal(raw_state(workdir), raw_state(tmp_path / "uninterrupted"))


@pytest.mark.slow
def test_merge_search_scored_by_clip_score_of_samples(sd_run):
    """metric="clip_score": every candidate UNet samples the prompt file and is scored by CLIP (negated: lower
    is better); the exported pipeline, evaluated the same way, has the best candidate's score."""
    from deme_jax.deme import merge_replicas
    from deme_jax.interop import load_stable_diffusion
    from deme_jax.metrics.scoring import evaluate_pipeline
    from tests.test_clip_score import random_clip, save_clip_directory

    root = sd_run["root"]
    clip_dir = save_clip_directory(random_clip(), root / "clip")
    (root / "prompts.txt").write_text("a red bird\na bowl of soup\n")
    config, workdir = finetuned(sd_run, "clip_merge")
    config.merge.metric = "clip_score"
    config.evaluate.update(dict(prompts=str(root / "prompts.txt"), clip_model=str(clip_dir), num_samples=2,
                                batch_size=2, ddim_steps=2, guidance_scale=3.0, metrics=("clip_score",), num_seeds=1))
    result = merge_replicas(config, workdir)
    assert len(result["candidates"]) == 4
    assert result["score"] == min(c["score"] for c in result["candidates"])
    merged = evaluate_pipeline(load_stable_diffusion(workdir / "merge" / "diffusers"), config.evaluate, config.data)
    assert merged["per_seed"][0]["clip_score"] == pytest.approx(-result["score"], rel=1e-5)
