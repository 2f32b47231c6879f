"""UNet2D against diffusers' UNet2DModel on the same weights and inputs.

Tolerance: relative L2 error <= 1e-5 in float32. Both sides run the same
float32 arithmetic in a different order (XLA vs oneDNN convolutions, fused
softmax), which accumulates ~1e-7-1e-6 relative; a wrong mapping (a swapped
scale/bias, a transposed kernel, a wrong head count) gives errors of order 1.
"""

import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from safetensors.numpy import load_file, save_file

from deme_jax.interop import load_diffusers_unet, save_diffusers_unet
from deme_jax.interop.torch_pickle import convert_pickle_to_safetensors
from deme_jax.interop.unet import DDPM_CIFAR10_CONFIG, model_from_config
from tests.diffusers_util import CIFAR_LAYOUT, LSUN_CONFIG, LSUN_LAYOUT, random_unet, torch_forward

pytestmark = pytest.mark.reference

CASES = {
    "cifar10_layout_head_dim_null": dict(CIFAR_LAYOUT, sample_size=16, block_out_channels=(32, 64, 64, 64),
                                         attention_head_dim=None, norm_num_groups=8),
    "cifar10_layout_head_dim_8": dict(CIFAR_LAYOUT, sample_size=16, block_out_channels=(32, 64, 64, 64),
                                      attention_head_dim=8, norm_num_groups=8),
    "lsun_6_level_head_dim_8": dict(LSUN_LAYOUT, sample_size=32, block_out_channels=(16, 16, 32, 32, 64, 64),
                                    attention_head_dim=8, norm_num_groups=8),
    "diffusers_defaults_padding_1": dict(sample_size=16, block_out_channels=(32, 32, 64, 64), norm_num_groups=8,
                                         time_embedding_dim=48, mid_block_scale_factor=1.5, center_input_sample=True),
    # 32x32 with 64 channels and a batch of 4: the top level's convolutions run as Winograd's on CPUs.
    "cifar10_layout_32x32": dict(CIFAR_LAYOUT, sample_size=32, block_out_channels=(64, 64, 64, 64),
                                 attention_head_dim=None, norm_num_groups=8),
}
BATCH = {"cifar10_layout_32x32": 4}


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def inputs(config, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    size = config["sample_size"]
    x = rng.standard_normal((batch, size, size, config.get("in_channels", 3))).astype(np.float32)
    t = np.resize(np.array([0, 517, 999], dtype=np.int64), batch)
    return x, t


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_diffusers(name, tmp_path):
    config = CASES[name]
    reference = random_unet(**config)
    reference.save_pretrained(tmp_path)
    model, params = load_diffusers_unet(tmp_path)
    x, t = inputs(config, BATCH.get(name, 3))
    ours = jax.jit(model.apply)({"params": params}, jnp.asarray(x), jnp.asarray(t, jnp.int32))
    assert rel_err(ours, torch_forward(reference, x, t)) <= 1e-5


def test_pipeline_layout_and_legacy_attention_names(tmp_path):
    config = CASES["cifar10_layout_head_dim_null"]
    reference = random_unet(**config)
    reference.save_pretrained(tmp_path / "unet")
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(weights)
    renamed = {}
    for key, value in state.items():
        for new, old in legacy.items():
            key = key.replace(f".{new}.", f".{old}.")
        renamed[key] = value
    assert any(".proj_attn." in k for k in renamed)
    save_file(renamed, weights)
    model, params = load_diffusers_unet(tmp_path)  # the pipeline directory, not unet/
    x, t = inputs(config)
    assert rel_err(model.apply({"params": params}, x, t), torch_forward(reference, x, t)) <= 1e-5


def test_round_trip_is_bit_identical(tmp_path):
    reference = random_unet(**CASES["lsun_6_level_head_dim_8"])
    reference.save_pretrained(tmp_path / "src")
    model, params = load_diffusers_unet(tmp_path / "src")
    save_diffusers_unet(model, params, tmp_path / "dst")
    reloaded = UNet2DModel.from_pretrained(tmp_path / "dst")
    expected, got = reference.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    as_json = lambda config: json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))
    for key, value in as_json(reference.config).items():
        assert as_json(reloaded.config)[key] == value, key


@pytest.mark.parametrize("config", [DDPM_CIFAR10_CONFIG, LSUN_CONFIG], ids=["cifar10_35.7M", "lsun_6_level"])
def test_full_size_models_have_diffusers_parameter_count(config):
    torch.manual_seed(0)
    expected = sum(p.numel() for p in UNet2DModel(**config).parameters())
    model = model_from_config(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32))
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) == expected
    if config is DDPM_CIFAR10_CONFIG:
        assert expected == 35_746_307


# --- bad input: each error names the problem and the fix -------------------------------------------


class _WritesFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_checkpoint_is_refused_and_never_unpickled(tmp_path):
    model_dir = tmp_path / "model"
    random_unet(**CASES["cifar10_layout_head_dim_null"]).save_pretrained(model_dir, safe_serialization=False)
    marker = tmp_path / "unpickled"
    (model_dir / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_WritesFileWhenUnpickled(marker)))
    with pytest.raises(ValueError, match=r"pickle.*never unpickles.*deme convert .*diffusion_pytorch_model\.bin"):
        load_diffusers_unet(model_dir)
    with pytest.raises(ValueError, match="weights_only"):
        convert_pickle_to_safetensors(model_dir / "diffusion_pytorch_model.bin", tmp_path / "out.safetensors")
    assert not marker.exists()


def test_pickle_state_dict_converts_once_to_safetensors(tmp_path):
    config = CASES["cifar10_layout_head_dim_null"]
    reference = random_unet(**config)
    model_dir = tmp_path / "model"
    reference.save_pretrained(model_dir, safe_serialization=False)
    assert not (model_dir / "diffusion_pytorch_model.safetensors").exists()
    convert_pickle_to_safetensors(model_dir / "diffusion_pytorch_model.bin",
                                  model_dir / "diffusion_pytorch_model.safetensors")
    model, params = load_diffusers_unet(model_dir)
    x, t = inputs(config)
    assert rel_err(model.apply({"params": params}, x, t), torch_forward(reference, x, t)) <= 1e-5


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json.*pipeline"):
        load_diffusers_unet(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(CASES["cifar10_layout_head_dim_null"]))
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors is missing"):
        load_diffusers_unet(tmp_path)


def test_corrupt_weights(tmp_path):
    random_unet(**CASES["cifar10_layout_head_dim_null"]).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_diffusers_unet(tmp_path)


@pytest.mark.parametrize("key,value,message", [
    ("resnet_time_scale_shift", "scale_shift", r"resnet_time_scale_shift='scale_shift' is not supported"),
    ("down_block_types", ["CrossAttnDownBlock2D"] * 4, r"down_block_types contains \['CrossAttnDownBlock2D'"),
    ("some_future_option", 3, r"'some_future_option' .* not supported"),
])
def test_unsupported_config_values(tmp_path, key, value, message):
    random_unet(**CASES["cifar10_layout_head_dim_null"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_diffusers_unet(tmp_path)


def test_shape_mismatch_names_the_key(tmp_path):
    random_unet(**CASES["cifar10_layout_head_dim_null"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["block_out_channels"] = [32, 64, 64, 128]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"Shape mismatch for [\w.]+: the checkpoint has"):
        load_diffusers_unet(tmp_path)


def test_channel_projection_starts_as_identity():
    config = CASES["cifar10_layout_head_dim_null"]
    plain = model_from_config(config)
    projected = plain.clone(channel_projection=True)
    x, t = inputs(config)
    params = projected.init(jax.random.key(1), x, t)["params"]
    kernels = [p for path, p in jax.tree_util.tree_leaves_with_path(params)
               if "channel_projection" in jax.tree_util.keystr(path)]
    assert len(kernels) == 4 + 1 + 4  # after each down block, the mid block and each up block
    stripped = jax.tree_util.tree_map(lambda x: x, params)
    for block in stripped.values():
        if isinstance(block, dict):
            block.pop("channel_projection", None)
    np.testing.assert_array_equal(projected.apply({"params": params}, x, t),
                                  plain.apply({"params": stripped}, x, t))


@pytest.mark.slow  # 23 s; the SD UNet's remat is checked by default in test_unet_condition.py
def test_remat_gives_the_same_outputs_and_gradients_with_dropout():
    """Equal up to float32 rounding (XLA fuses the recomputed forward differently); the recomputation draws the
    same dropout masks, and ``train`` stays static through the rematerialised blocks."""
    config = dict(CASES["cifar10_layout_head_dim_null"], dropout=0.1)
    model = model_from_config(config)
    x, t = inputs(config)
    params = model.init(jax.random.key(1), x, t)["params"]

    def value_and_grad(m):
        loss = lambda p: jnp.mean(m.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(2)}) ** 2)
        loss, grads = jax.jit(jax.value_and_grad(loss))(params)
        return loss, np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grads)])

    (loss, grads), (loss_remat, grads_remat) = value_and_grad(model), value_and_grad(model.clone(remat=True))
    assert rel_err(loss_remat, loss) <= 1e-6
    assert rel_err(grads_remat, grads) <= 1e-6
