"""`deme evaluate`: sampling in seeded batches, FID/KID/FD-MNIST against reference images, the report files."""

import json

import jax
import numpy as np
import pytest

from configs import default
from deme_jax.diffusion import make_schedule
from deme_jax.commands.evaluate import run as evaluate
from deme_jax.data import reference_images
from deme_jax.diffusion import sample_images
from deme_jax.metrics.scoring import Scorer
from deme_jax.interop import save_orbax_model
from deme_jax.models import UNet2D, init_params

MODEL = UNet2D(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
               down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
               layers_per_block=1, norm_num_groups=4)


def eval_config(**fields):
    config = default.get_config()
    config.data.update(dict(name="mnist", image_size=16, channels=1, random_flip=False))
    config.evaluate.update({"num_samples": 12, "num_seeds": 2, "batch_size": 8, "ddim_steps": 2,
                            "num_reference": 40, "metrics": ("fid", "kid", "fd_mnist"), **fields})
    return config


def test_evaluate_writes_scores_per_seed_a_grid_and_a_summary(tmp_path):
    path = save_orbax_model(MODEL, init_params(MODEL, jax.random.key(0)), tmp_path / "model")
    config = eval_config(model=str(path))
    result = evaluate(config, tmp_path / "run")
    written = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert len(result["per_seed"]) == 2 and result["num_reference"] == 40
    for name in ("fid", "kid", "fd_mnist"):
        values = [s[name] for s in result["per_seed"]]
        assert np.all(np.isfinite(values)) and values[0] != values[1]  # the seeds drew different noise
        assert result["summary"][name]["mean"] == pytest.approx(np.mean(values))
        assert result["summary"][name]["std"] == pytest.approx(np.std(values, ddof=1))
    assert (tmp_path / "run" / "eval" / "samples.png").is_file()
    # an untrained model's noise is far from digits; real training digits are close to the held-out ones
    scorer = Scorer(config.evaluate, config.data)
    real = scorer.score(reference_images("train", config.data, 40))
    assert result["summary"]["fd_mnist"]["mean"] > 5 * real["fd_mnist"]
    assert result["summary"]["fid"]["mean"] > real["fid"]


def test_what_is_scored_for_a_model_path_or_a_workdir(tmp_path):
    """config.evaluate.model (or the workdir) may be a model, or a workdir whose `deme merge` wrote merge/orbax or,
    for Stable Diffusion, merge/diffusers: the merge is scored."""
    from deme_jax.commands.evaluate import model_to_score

    other = tmp_path / "other_run"
    assert model_to_score(other) == (other, False)  # a training workdir: load_model reads its EMA weights
    merged = save_orbax_model(MODEL, init_params(MODEL, jax.random.key(0)), other / "merge" / "orbax")
    assert model_to_score(other) == (merged, False) and model_to_score(merged) == (merged, False)
    (other / "merge" / "diffusers").mkdir()
    (other / "merge" / "diffusers" / "model_index.json").write_text("{}")
    assert model_to_score(other) == (other / "merge" / "diffusers", True)
    assert model_to_score(other / "merge" / "diffusers") == (other / "merge" / "diffusers", True)


def test_first_images_do_not_depend_on_how_many_are_drawn():
    params = init_params(MODEL, jax.random.key(0))
    few = sample_images(MODEL, params, make_schedule(), 3, (16, 16, 1), jax.random.key(5), batch_size=4, ddim_steps=2)
    more = sample_images(MODEL, params, make_schedule(), 6, (16, 16, 1), jax.random.key(5), batch_size=4, ddim_steps=2)
    assert few.dtype == np.uint8 and few.shape == (3, 16, 16, 1)
    np.testing.assert_array_equal(few, more[:3])


@pytest.mark.slow
def test_fid_on_the_first_samples_only():
    config = eval_config(metrics=("fid",), fid_samples=20)
    scorer = Scorer(config.evaluate, config.data)
    images = reference_images("train", config.data, 40)
    assert scorer.score(images)["fid"] == pytest.approx(scorer.score(images[:20])["fid"], rel=1e-9)
    assert scorer.score(images)["fid"] != scorer.score(images[20:])["fid"]


def test_the_reference_scores_itself_as_zero():
    config = eval_config(metrics=("fd_mnist",))
    scorer = Scorer(config.evaluate, config.data)
    # 40 images of 128-d features: a rank-39 covariance, whose matrix square root is accurate to about 1e-4
    assert scorer.score(reference_images("heldout", config.data, 40))["fd_mnist"] == pytest.approx(0, abs=1e-3)


def test_bad_evaluation_settings(tmp_path):
    config = eval_config(metrics=("fid", "is_score"))
    with pytest.raises(ValueError, match=r"config.evaluate.metrics has \['is_score'\]"):
        Scorer(config.evaluate, config.data)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    config = eval_config(reference=str(tmp_path / "stats.npz"), metrics=("fid", "fd_mnist"))
    with pytest.raises(ValueError, match="holds FID statistics only"):
        Scorer(config.evaluate, config.data)
