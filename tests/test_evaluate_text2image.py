"""`deme evaluate` of a Stable Diffusion pipeline, the COCO protocol: images for a prompt file over seeds, FID and
KID of the images resized to fid_resolution, CLIP score of each image with its prompt."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from configs import deme as deme_config
from deme_jax import text2image
from deme_jax.commands.evaluate import run as evaluate
from deme_jax.interop import load_stable_diffusion
from deme_jax.metrics.clip_score import CLIPScorer
from deme_jax.metrics.fid import compute_statistics, frechet_distance, load_inception
from deme_jax.metrics.scoring import sample_noise
from deme_jax.images import to_uint8
from tests.sd_util import tiny_pipeline
from tests.test_clip_score import random_clip, save_clip_directory

pytestmark = pytest.mark.reference

PROMPTS = ["a red bird on a branch", "two dogs in the snow", "a bowl of soup", "a city at night"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_sd")
    sd_dir = tiny_pipeline(root / "sd")[1]
    clip_dir = save_clip_directory(random_clip(), root / "clip")
    reference = root / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(reference / f"{i}.png")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    return {"root": root, "sd_dir": sd_dir, "clip_dir": clip_dir, "reference": reference}


def config_for(setup, **fields):
    config = deme_config.get_config()
    config.evaluate.update({**dict(model=str(setup["sd_dir"]), prompts=str(setup["root"] / "prompts.txt"),
                                   num_samples=3, num_seeds=2, batch_size=2, ddim_steps=2, guidance_scale=3.0,
                                   fid_resolution=32, metrics=("fid", "kid", "clip_score"),
                                   reference=str(setup["reference"]), clip_model=str(setup["clip_dir"])), **fields})
    return config


def test_scores_each_seed_and_pairs_every_image_with_its_prompt(setup, tmp_path):
    config = config_for(setup)
    result = evaluate(config, tmp_path)
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == json.loads(json.dumps(result))
    assert result["num_samples"] == 3 and result["resolution"] == 16 and result["num_reference"] == 6
    assert (tmp_path / "eval" / "samples.png").is_file()
    for name in ("fid", "kid", "clip_score"):
        values = [s[name] for s in result["per_seed"]]
        assert np.all(np.isfinite(values)) and values[0] != values[1]  # the seeds drew different latents
        assert result["summary"][name]["mean"] == pytest.approx(np.mean(values))
        assert result["summary"][name]["std"] == pytest.approx(np.std(values, ddof=1))
    # seed 1 again, by hand: the first three prompts with the latents of stream eval_noise 1
    pipeline = load_stable_diffusion(setup["sd_dir"])
    latents = jax.random.normal(sample_noise(config.evaluate, 1), (3, 8, 8, 4))
    images = to_uint8(text2image.generate(pipeline, PROMPTS[:3], latents=latents, num_inference_steps=2,
                                          guidance_scale=3.0) * 2 - 1)
    clip = CLIPScorer.from_directory(setup["clip_dir"])(images, PROMPTS[:3])[1]
    assert result["per_seed"][1]["clip_score"] == pytest.approx(clip, rel=1e-5)
    shuffled = CLIPScorer.from_directory(setup["clip_dir"])(images, PROMPTS[1:3] + PROMPTS[:1])[1]
    assert shuffled != pytest.approx(clip, rel=1e-3)  # the pairing matters to the score
    inception = load_inception()
    reference = np.stack([np.asarray(Image.open(setup["reference"] / f"{i}.png").resize((32, 32), Image.BICUBIC))
                          for i in range(6)])
    downsampled = np.stack([np.asarray(Image.fromarray(x).resize((32, 32), Image.BICUBIC)) for x in images])
    fid = frechet_distance(*compute_statistics(inception(downsampled)), *compute_statistics(inception(reference)))
    assert result["per_seed"][1]["fid"] == pytest.approx(fid, rel=1e-4)


@pytest.mark.parametrize("fields, message", [
    (dict(prompts=""), r"config.evaluate.prompts='' holds no prompt"),
    (dict(reference="heldout"), r"config.evaluate.reference='heldout': a text-to-image model's FID reference"),
    (dict(metrics=("fd_mnist",)), r"config.evaluate.metrics has \['fd_mnist'\]"),
    (dict(clip_model=""), r"'clip_score' but config.evaluate.clip_model is empty"),
    (dict(sampler="ddpm"), r"config.evaluate.sampler='ddpm'"),
])
def test_bad_text_to_image_settings_name_the_field(setup, tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        evaluate(config_for(setup, **fields), tmp_path)
    assert not (tmp_path / "eval").exists()
