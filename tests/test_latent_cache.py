"""The latent cache on a tiny random Stable Diffusion: what it stores against the encoders themselves, the batches
finetuning reads from it, refusals (another model, another spec, an unfinished cache) and exact resume, in process
and after SIGKILL of a real `deme cache-latents`."""

import functools
import hashlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from deme_jax.commands import cache_latents
from deme_jax.data import CaptionFolder
from deme_jax.defaults import deme_config
from deme_jax.interop import load_stable_diffusion
from deme_jax.text2image import (
    LatentCache,
    LatentStream,
    build_latent_cache,
    encode_prompts,
    open_latent_cache,
    weights_fingerprint,
)
from tests.runs import ROOT, deme
from tests.sd_util import tiny_pipeline

RESOLUTION = 16  # the tiny VAE downsamples by 2: 8x8 latents, the tiny UNet's sample_size
LAYOUT = dict(shard_size=4, batch_size=3)  # 10 examples: shards of 4, 4, 2; batches of 3, 1 (padded), 3, 1, 2


def write_pairs(folder, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        size = (RESOLUTION + i % 5, RESOLUTION + 2 * (i % 3))
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"photo {i} of a {['red', 'blue', 'green'][i % 3]} bird on a branch")
    return folder


def contents(path):
    """Every file under ``path`` and a hash of its bytes."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("sd"))[1]


@pytest.fixture(scope="module")
def pipeline(sd_dir):
    return load_stable_diffusion(sd_dir)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"), 10)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, pipeline, folder, sd_dir):
    path = tmp_path_factory.mktemp("cache") / "train"
    build_latent_cache(CaptionFolder(str(folder), RESOLUTION), pipeline, path, model=str(sd_dir), **LAYOUT)
    return path


@functools.partial(jax.jit, static_argnums=0)
def posterior(vae, params, images):
    """The VAE's own encode as one program, as the cache runs it."""
    out = vae.apply({"params": params}, images, method="encode")
    return out.mean, out.std


def test_cache_holds_what_the_encoders_give(cache_dir, pipeline, folder):
    source = CaptionFolder(str(folder), RESOLUTION)
    images = np.stack([source[i].image for i in range(10)]).astype(np.float32) / 127.5 - 1
    captions = [source[i].caption for i in range(10)]
    cache = LatentCache(cache_dir)
    mean, std, text = cache.rows(range(10))
    # The first batch (examples 0-2, unpadded) through the same programs: bit for bit.
    first_mean, first_std = posterior(pipeline.vae, pipeline.params["vae"], images[:3])
    np.testing.assert_array_equal(mean[:3], first_mean)
    np.testing.assert_array_equal(std[:3], first_std)
    np.testing.assert_array_equal(text[:3], encode_prompts(pipeline, captions[:3]))
    # Every example against one call of each encoder on all ten at once (other batches, other programs).
    all_mean, all_std = posterior(pipeline.vae, pipeline.params["vae"], images)
    np.testing.assert_allclose(mean, all_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, all_std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(text, encode_prompts(pipeline, captions), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.empty_text, encode_prompts(pipeline, [""] * 3)[0])
    assert mean.shape == (10, 8, 8, 4) and text.shape == (10, 77, 32) and np.all(std > 0)
    shards = sorted(p.name for p in cache_dir.iterdir() if p.name.startswith("shard_"))
    assert shards == ["shard_00000", "shard_00001", "shard_00002"]
    rows = [e for s in shards for e in json.loads((cache_dir / s / "examples.json").read_text())]
    assert rows == [{"name": n, "caption": c} for n, c in zip(source.names, captions)]
    spec = cache.spec
    assert spec["fingerprint"] == weights_fingerprint(pipeline) and spec["source"] == source.description
    assert (spec["num_examples"], spec["latent_shape"], spec["scaling_factor"]) == (10, [8, 8, 4], 0.18215)


def test_float16_cache_is_the_float32_one_rounded(tmp_path, cache_dir, pipeline, folder):
    build_latent_cache(CaptionFolder(str(folder), RESOLUTION), pipeline, tmp_path, model="", dtype="float16",
                       **LAYOUT)
    for shard in ("shard_00000", "shard_00002"):
        for name in ("latent_mean", "latent_std", "text"):
            half = np.load(tmp_path / shard / f"{name}.npy")
            assert half.dtype == np.float16
            np.testing.assert_array_equal(half, np.load(cache_dir / shard / f"{name}.npy").astype(np.float16))


def test_batches_sample_the_posterior_and_drop_captions(cache_dir):
    cache = LatentCache(cache_dir)
    stream = LatentStream(cache, 8, seed=(0, 5), caption_dropout=0.3)
    eps, dropped = [], []
    for step in range(60):
        batch = stream.batch(step)
        mean, std, text = cache.rows(stream.global_indices(step))
        eps.append((batch["latents"] / cache.spec["scaling_factor"] - mean) / std)
        empty = np.all(batch["text"] == cache.empty_text, axis=(1, 2))
        np.testing.assert_array_equal(batch["text"][~empty], text[~empty])
        dropped.append(empty)
    eps, dropped = np.concatenate(eps), np.concatenate(dropped)
    assert abs(eps.mean()) < 0.02 and abs(eps.std() - 1) < 0.02  # 123k draws: 4 standard errors are 0.011
    assert abs(dropped.mean() - 0.3) < 0.09  # 480 rows: 4 standard errors
    assert not np.array_equal(stream.batch(0)["latents"], stream.batch(60)["latents"])
    for p, expected in ((0.0, 0.0), (1.0, 1.0)):
        always = LatentStream(cache, 8, seed=(0, 5), caption_dropout=p).batch(3)["text"]
        assert np.all(always == cache.empty_text, axis=(1, 2)).mean() == expected
    with pytest.raises(ValueError, match=r"config.data.caption_dropout=1.5 must lie in \[0, 1\]"):
        LatentStream(cache, 8, seed=0, caption_dropout=1.5)


def test_global_batch_does_not_depend_on_process_count(cache_dir):
    cache = LatentCache(cache_dir)
    one = LatentStream(cache, 8, seed=3, caption_dropout=0.5)
    for count in (2, 4):
        streams = [LatentStream(cache, 8, seed=3, caption_dropout=0.5, process_index=p, process_count=count)
                   for p in range(count)]
        for step in (0, 7):
            for key in ("latents", "text"):
                np.testing.assert_array_equal(np.concatenate([s.batch(step)[key] for s in streams]),
                                              one.batch(step)[key])


def test_stream_resumes_exactly(cache_dir):
    cache = LatentCache(cache_dir)
    stream = LatentStream(cache, 4, seed=7, caption_dropout=0.2, process_index=1, process_count=2)
    uninterrupted = [next(stream) for _ in range(9)]
    stream.close()
    first = LatentStream(cache, 4, seed=7, caption_dropout=0.2, process_index=1, process_count=2)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.state()))
    first.close()
    resumed = LatentStream(cache, 4, seed=7, caption_dropout=0.2, process_index=1, process_count=2,
                           start_step=state["step"])
    for expected in uninterrupted[4:]:
        batch = next(resumed)
        for key in ("latents", "text"):
            np.testing.assert_array_equal(batch[key], expected[key])
    resumed.restore({"step": 1})
    np.testing.assert_array_equal(next(resumed)["latents"], uninterrupted[1]["latents"])
    resumed.close()


def test_a_cache_from_another_model_is_refused(tmp_path, cache_dir, pipeline, folder):
    params = dict(pipeline.params)
    params["text_encoder"] = jax.tree_util.tree_map(lambda x: x * 1.001, params["text_encoder"])
    other = pipeline.replace(params=params)
    ours, theirs = weights_fingerprint(pipeline), weights_fingerprint(other)
    assert ours != theirs and len(ours) == 16
    assert weights_fingerprint(pipeline.replace(vae=pipeline.vae.clone(dtype=jnp.bfloat16))) == ours
    assert len(open_latent_cache(cache_dir, ours)) == 10
    with pytest.raises(ValueError, match=rf"encoded by another VAE and text encoder \(fingerprint {ours}, from .*\) "
                                         rf"than this model's \(fingerprint {theirs}\)\. Run `deme cache-latents` "
                                         r"with this model"):
        open_latent_cache(cache_dir, other)
    with pytest.raises(ValueError, match=rf"fingerprint: '{ours}' in the cache -> '{theirs}' now.*delete"):
        build_latent_cache(CaptionFolder(str(folder), RESOLUTION), other, cache_dir, model="other", **LAYOUT)


def test_a_cache_of_other_inputs_is_refused(cache_dir, pipeline, folder):
    before = contents(cache_dir)
    with pytest.raises(ValueError, match=r"latent_shape: \[8, 8, 4\] in the cache -> \[16, 16, 4\] now; "
                                         r"source.resolution: 16 in the cache -> 32 now\. To cache these, delete"):
        build_latent_cache(CaptionFolder(str(folder), 32, upscale=True), pipeline, cache_dir, model="", **LAYOUT)
    with pytest.raises(ValueError, match=r"shard_size: 4 in the cache -> 5 now"):
        build_latent_cache(CaptionFolder(str(folder), RESOLUTION), pipeline, cache_dir, model="", shard_size=5,
                           batch_size=3)
    assert contents(cache_dir) == before


def test_a_stopped_run_resumes_to_the_same_cache(tmp_path, cache_dir, pipeline, folder, sd_dir):
    """An image that stops reading half-way through (after the start-up scan) stops the run; the shards before it
    stay whole, the cache reads as unfinished, and the run with the image repaired ends bit-identical."""
    source = CaptionFolder(str(folder), RESOLUTION)
    original = (folder / "009.png").read_bytes()
    (folder / "009.png").write_bytes(original[:40])
    try:
        with pytest.raises(OSError):
            build_latent_cache(source, pipeline, tmp_path, model=str(sd_dir), **LAYOUT)
    finally:
        (folder / "009.png").write_bytes(original)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty_text.npy", "index.json", "shard_00000",
                                                          "shard_00001"]
    with pytest.raises(ValueError, match=r"is incomplete \(1 of 3 shards missing\): run `deme cache-latents`"):
        LatentCache(tmp_path)
    build_latent_cache(source, pipeline, tmp_path, model=str(sd_dir), **LAYOUT)
    assert contents(tmp_path) == contents(cache_dir)


def test_processes_write_alternate_shards(tmp_path, cache_dir, pipeline, folder, sd_dir):
    source = CaptionFolder(str(folder), RESOLUTION)
    build_latent_cache(source, pipeline, tmp_path, model=str(sd_dir), process_index=1, process_count=2, **LAYOUT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_00001"]  # process 0 writes the index
    build_latent_cache(source, pipeline, tmp_path, model=str(sd_dir), process_index=0, process_count=2, **LAYOUT)
    assert contents(tmp_path) == contents(cache_dir)


def command_config(sd_dir, folder, **cache):
    config = deme_config()
    config.deme.pretrained = str(sd_dir)
    config.data.update(dict(name="folder", folder=str(folder), image_size=RESOLUTION, heldout_fraction=0.0,
                            random_flip=False))
    config.cache.update({**LAYOUT, **cache})
    return config


@pytest.mark.parametrize("field, value, message", [
    ("data.random_flip", True, r"config.data.random_flip=True: cached latents are encoded once"),
    ("data.image_size", 15, r"config.data.image_size=15 is not a multiple of 2, the VAE's downsampling factor"),
    ("cache.shard_size", 0, r"config.cache.shard_size=0 must be a positive int"),
    ("cache.dtype", "bfloat16", r"config.cache.dtype='bfloat16': use one of float32, float16"),
    ("deme.pretrained", "", r"config.deme.pretrained is empty"),
])
def test_the_command_names_the_field_at_fault(tmp_path, sd_dir, folder, field, value, message):
    config = command_config(sd_dir, folder)
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
        cache_latents.run(config, tmp_path)
    assert not (tmp_path / "latent_cache").exists()


def cache_command(sd_dir, folder, workdir) -> list[str]:
    return ["cache-latents", f"--config={ROOT / 'configs' / 'deme.py'}", f"--workdir={workdir}",
            f"--config.deme.pretrained={sd_dir}", "--config.data.name=folder", f"--config.data.folder={folder}",
            f"--config.data.image_size={RESOLUTION}", "--config.data.heldout_fraction=0.0",
            "--config.data.random_flip=False", "--config.cache.shard_size=1", "--config.cache.batch_size=1"]


@pytest.mark.slow  # three runs of the command: about a minute on 2 cores
def test_sigkill_mid_way_then_rerun_gives_the_uninterrupted_cache(tmp_path, sd_dir):
    folder = write_pairs(tmp_path / "pairs", 150, seed=1)  # 150 shards of one: seconds of writing to kill in
    reference = deme(cache_command(sd_dir, folder, tmp_path / "reference"))
    out = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, out[-3000:]
    assert "Encoded 150 examples" in out and "images/s" in out

    cache = tmp_path / "killed" / "latent_cache" / "train"
    first = deme(cache_command(sd_dir, folder, tmp_path / "killed"))
    deadline = time.time() + 300
    while not (cache / "shard_00002").is_dir():
        assert first.poll() is None and time.time() < deadline, first.stdout.read()[-3000:]
        time.sleep(0.005)
    first.kill()
    first.communicate(timeout=60)
    written = sorted(p.name for p in cache.glob("shard_*"))
    assert 3 <= len(written) < 150, "the run ended before the kill: give it more shards"
    for shard in written:  # whole shards only: each has all its files
        assert sorted(p.name for p in (cache / shard).iterdir()) == ["examples.json", "latent_mean.npy",
                                                                     "latent_std.npy", "text.npy"]
    with pytest.raises(ValueError, match="is incomplete"):
        LatentCache(cache)

    second = deme(cache_command(sd_dir, folder, tmp_path / "killed"))
    out = second.communicate(timeout=600)[0]
    assert second.returncode == 0, out[-3000:]
    assert f"this process encodes {150 - len(written)} shards" in out
    assert contents(cache) == contents(tmp_path / "reference" / "latent_cache" / "train")
