"""`deme demo` end to end at the `test` preset, and the recipe of the shipped pretrained model."""

import json
import math

import jax
import numpy as np
import pytest

from deme_jax.commands.demo import COMPARISONS, LEARNED, MODELS, paired_difference, run_demo
from deme_jax.interop import save_diffusers_unet
from deme_jax.models import UNet2D, init_params
from tests.metrics_util import read_scalars


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports_every_number(tmp_path):
    # a small stand-in for the shipped model, so the test does not depend on its training
    model = UNet2D(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                   down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                   layers_per_block=1, norm_num_groups=4)
    pretrained = save_diffusers_unet(model, init_params(model, jax.random.key(0)), tmp_path / "pretrained")
    report = run_demo(tmp_path / "demo", "test", str(pretrained))
    written = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert list(written["models"]) == [*MODELS, *LEARNED, "deme_conflict_merged"]  # the test preset compares all
    for name, row in written["models"].items():
        for metric in ("fid", "fd_mnist"):
            assert math.isfinite(row[metric]["mean"]) and math.isfinite(row[metric]["std"])
        assert len(row["loss_by_interval"]["mean"]) == 4
        assert all(math.isfinite(v) for v in row["loss_by_interval"]["mean"] + row["loss_by_interval"]["std"])
    assert len(written["merge"]["weights"]) == 4 and math.isfinite(written["timing"]["total_s"])
    assert set(written["timing"]["stages_s"]) == {
        "deme_finetune", "finetune_n1", "merge", "merge_deme_gradient", "merge_deme_gradient_block",
        "deme_conflict_finetune", "merge_deme_conflict_merged", "evaluate", "figures"}
    assert len(written["comparisons"]) == 3 * len(COMPARISONS)
    assert all(math.isfinite(c["mean"]) for c in written["comparisons"])
    assert np.shape(written["merges"]["deme_gradient_block"]["weights"])[0] == 4
    boundaries = written["conflict_partition"]["boundaries"]
    assert written["merges"]["deme_conflict_merged"]["partition"] == boundaries and len(boundaries) == 5
    for figure in ("samples.png", "gradient_conflict.png", "merge_search.png", "conflict_partition.png",
                   "gradient_search.png", "report.md"):
        assert (tmp_path / "demo" / figure).is_file()
    markdown = (tmp_path / "demo" / "report.md").read_text()
    assert all(f"| {name} |" in markdown for name in written["models"])
    assert "deme_merged vs finetune_n1, FD-MNIST" in markdown
    assert "deme_gradient_block vs deme_merged, held-out loss" in markdown and "weights learned per block" in markdown


def test_paired_difference_is_a_paired_t_test_at_five_percent():
    clear = paired_difference([1.1, 1.0, 0.9], [0.0, 0.0, 0.0])  # mean 1, s.e. 0.1/sqrt(3): t = 17.3 > 4.30
    assert clear["mean"] == pytest.approx(1.0) and clear["sem"] == pytest.approx(0.1 / 3 ** 0.5) and clear["clear"]
    unclear = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])  # mean 2, s.e. 1/sqrt(3): t = 3.46 < 4.30
    assert unclear["sem"] == pytest.approx(3 ** -0.5) and not unclear["clear"]
    assert paired_difference([2.0, 3.0, 4.0, 2.5, 3.5], [0.0] * 5)["clear"]  # t = 8.5 > 2.78 with 4 dof
    assert not paired_difference([1.0], [0.0])["clear"]  # one seed has no spread to judge by


def test_demo_names_a_missing_pretrained_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/mnist16_pretrain.py"):
        run_demo(tmp_path, "test", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--preset 'huge'"):
        run_demo(tmp_path, "huge", str(tmp_path / "missing"))


@pytest.mark.slow  # 30 steps of the real recipe; the demo itself runs the shipped model
def test_the_shipped_models_recipe_trains(tmp_path):
    from configs import mnist16_pretrain
    from deme_jax.train import train_and_evaluate

    config = mnist16_pretrain.get_config()
    config.train.update(dict(batch_size=16, num_steps=30, log_every=10, checkpoint_every=30, eval_every=10,
                             sample_every=0))
    config.eval.num_images = 32
    state = train_and_evaluate(config, tmp_path)
    assert int(state.step) == 30
    scalars = read_scalars(tmp_path)  # the recipe learns: its held-out and training losses fall
    heldout, train = scalars["heldout/loss"], scalars["train/loss"]
    assert heldout[30] < heldout[20] < heldout[10] and train[30] < train[10]
