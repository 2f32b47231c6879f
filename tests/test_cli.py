"""The ``deme`` command end to end: format conversions, sampling, and what it prints when things go wrong."""

import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from PIL import Image

from deme_jax.cli import main
from deme_jax.interop import load_orbax_model
from tests.diffusers_util import CIFAR_LAYOUT, random_unet

pytestmark = pytest.mark.reference

TINY = dict(CIFAR_LAYOUT, sample_size=16, block_out_channels=(32, 32, 32, 32), attention_head_dim=None,
            norm_num_groups=8)


def test_convert_diffusers_to_orbax_and_back_is_bit_identical(tmp_path):
    reference = random_unet(**TINY)
    reference.save_pretrained(tmp_path / "diffusers")
    main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "orbax")])
    model, params = load_orbax_model(tmp_path / "orbax")
    assert model.sample_size == 16 and model.attention_head_dim is None
    main(["convert", str(tmp_path / "orbax"), str(tmp_path / "back")])
    reloaded = UNet2DModel.from_pretrained(tmp_path / "back").state_dict()
    assert reloaded.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(value, reloaded[key]), key


def test_convert_refuses_to_overwrite_a_checkpoint(tmp_path, capsys):
    random_unet(**TINY).save_pretrained(tmp_path / "diffusers")
    (tmp_path / "orbax").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "orbax")])
    assert exit_info.value.code == 2 and "already exists" in capsys.readouterr().err


def test_convert_pickle_to_safetensors(tmp_path):
    reference = random_unet(**TINY)
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    main(["convert", str(tmp_path / "weights.pt"), str(tmp_path / "weights.safetensors")])
    from safetensors.torch import load_file

    converted = load_file(tmp_path / "weights.safetensors")
    assert all(torch.equal(v, converted[k]) for k, v in reference.state_dict().items())


def test_sample_grid_from_a_pipeline_directory(tmp_path):
    random_unet(**TINY).save_pretrained(tmp_path / "pipe" / "unet")
    DDIMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "pipe" / "scheduler")
    out = tmp_path / "grid.png"
    main(["sample", "--model", str(tmp_path / "pipe"), "--steps", "3", "--num-images", "4", "--out", str(out)])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 18 + 2, 2 * 18 + 2, 3)
    assert grid.std() > 0


def test_sample_names_a_missing_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert re.search(r"deme sample: No model at .*nowhere", capsys.readouterr().err)


def test_training_workdir_exports_its_ema_weights_and_samples(tmp_path):
    from deme_jax.train import train_and_evaluate
    from tests import tiny_config

    config = tiny_config.get_config()
    config.train.update(dict(num_steps=2, checkpoint_every=2, eval_every=0, sample_every=0))
    state = train_and_evaluate(config, tmp_path / "run")
    main(["convert", str(tmp_path / "run"), str(tmp_path / "export")])
    model, params = load_orbax_model(tmp_path / "export")
    assert model.block_out_channels == (16, 32) and model.in_channels == 1
    for ours, ema in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(state.ema_params)):
        np.testing.assert_array_equal(ours, ema)
    main(["sample", "--model", str(tmp_path / "run"), "--steps", "2", "--num-images", "1",
          "--out", str(tmp_path / "grid.png")])
    assert np.asarray(Image.open(tmp_path / "grid.png")).shape == (36, 36)


def test_fid_weights_converts_the_shipped_torchscript_network(tmp_path):
    from deme_jax.metrics import fid_weights

    main(["fid-weights", "--out", str(tmp_path / "fid.safetensors")])
    ours = fid_weights.load_tensors(str(tmp_path / "fid.safetensors"))
    network = torch.jit.load(fid_weights.find_fid_helper_weights(), map_location="cpu")
    first_conv = next(v for k, v in network.state_dict().items() if k.endswith("weight") and v.ndim == 4)
    np.testing.assert_array_equal(ours["Conv2d_1a_3x3.conv.weight"], first_conv.numpy())


BACKGROUND_ERRORS = """
import asyncio, gc, sys
from absl import app
from deme_jax.cli import quiet_background_errors

async def fail(message):
    raise ValueError(message)

def main(_):
    quiet_background_errors()
    loop = asyncio.new_event_loop()
    tasks = [loop.create_task(fail(m)) for m in ("Failed to write: No space left on device", "another fault")]
    loop.run_until_complete(asyncio.sleep(0.01))
    del tasks
    gc.collect()  # asyncio reports the unretrieved errors now, as it does at exit after a failed save

app.run(main)
"""


def test_background_reports_of_a_full_disk_are_quiet_and_others_are_not():
    proc = subprocess.run([sys.executable, "-c", BACKGROUND_ERRORS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "No space left" not in proc.stderr and "another fault" in proc.stderr, proc.stderr[-3000:]


def test_a_value_error_is_one_line_when_deme_jax_words_it_and_a_traceback_when_a_library_raises_it():
    """ConfigError and the loaders' messages are for users; a ValueError from outside this package (a shape error in
    numpy, a JSON decoder) is a fault whose traceback is kept."""
    import json

    from deme_jax.cli import is_user_error
    from deme_jax.train.validate import require

    def caught(fn):
        try:
            fn()
        except Exception as err:
            return err

    assert is_user_error(caught(lambda: require(False, "config.train.batch_size=0 must be > 0.")))
    assert not is_user_error(caught(lambda: json.loads("{")))
    assert not is_user_error(caught(lambda: np.ones(3).reshape(2)))
    assert is_user_error(caught(lambda: open("/nonexistent/file")))
