"""UNet2DCondition against diffusers' UNet2DConditionModel on the same weights and inputs.

Tolerance: relative L2 error <= 1e-5 in float32, as for UNet2D: the same
arithmetic in a different order accumulates ~1e-7-1e-6 relative, while a
wrong mapping (a wrong head count, a swapped norm, a transposed kernel) gives
errors of 1e-2 and more with these weights.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from flax import traverse_util

from deme_jax.interop.torch_layout import load_pretrained, save_pretrained, state_dict_from_params
from deme_jax.interop.unet_condition import (
    SD15_CONFIG, SD21_CONFIG, WEIGHTS_NAME, model_from_config, model_to_config,
)
from deme_jax.models import layers
from deme_jax.models.layers import ChannelProjection
from deme_jax.models.registry import param_shapes
from deme_jax.models.unet_condition import UNet2DCondition

pytestmark = pytest.mark.reference

# The real layouts with small widths; cross_attention_dim 32 and 48 stand for CLIP's 768 and OpenCLIP's 1024.
CASES = {
    "sd1_layout": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                       cross_attention_dim=32, attention_head_dim=4, sample_size=8),
    "sd2_layout": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=16,
                       cross_attention_dim=48, attention_head_dim=(1, 2, 4, 4), use_linear_projection=True,
                       upcast_attention=True, transformer_layers_per_block=(1, 2, 1, 1), sample_size=8),
}
TINY = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=8,
            attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
ONE_LEVEL = dict(TINY, block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
                 up_block_types=("CrossAttnUpBlock2D",))
# For tests comparing two of our own programs: unoptimised code compiles several times faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def random_unet(config: dict, seed: int = 0) -> UNet2DConditionModel:
    """diffusers' random init plus noise on every parameter, norm scales and biases most, so no mapping hides."""
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.2 if p.ndim == 1 else 0.02) * torch.randn_like(p))
    return model


def inputs(config: dict, timesteps, tokens: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    size = config["sample_size"]
    x = rng.standard_normal((len(timesteps), size, size, 4)).astype(np.float32)
    text = rng.standard_normal((len(timesteps), tokens, config["cross_attention_dim"])).astype(np.float32)
    return x, np.asarray(timesteps), text


def torch_forward(model: UNet2DConditionModel, x_nhwc, t, text):
    with torch.no_grad():
        out = model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(text)).sample
    return out.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each case's random diffusers model and the directory its save_pretrained wrote."""
    out = {}
    for name, config in CASES.items():
        out[name] = random_unet(config), tmp_path_factory.mktemp(name)
        out[name][0].save_pretrained(out[name][1])
    return out


# Integer timesteps for SD 1.x, float ones for SD 2.x (schedulers such as DPM-Solver give floats).
TIMESTEPS = {"sd1_layout": [0, 517, 999], "sd2_layout": [0.5, 999.0]}


@pytest.mark.parametrize("chunked", [False, True], ids=["plain_attention", "chunked_attention"])
@pytest.mark.parametrize("name", CASES)
def test_forward_matches_diffusers(name, chunked, saved, monkeypatch):
    if chunked:  # every attention in query chunks, the last one padded, as on long sequences
        monkeypatch.setattr(layers, "ATTENTION_PLAIN_SCORES", 0)
        monkeypatch.setattr(layers, "ATTENTION_CHUNK_SCORES", 128)
    reference, model_dir = saved[name]
    model, params = load_pretrained(model_dir, model_from_config, WEIGHTS_NAME)
    x, t, text = inputs(CASES[name], TIMESTEPS[name])
    ours = jax.jit(model.apply)({"params": params}, x, t, text)
    assert ours.dtype == jnp.float32
    assert rel_err(ours, torch_forward(reference, x, t, text)) <= 1e-5


def test_round_trip_is_bit_identical(saved, tmp_path):
    reference, model_dir = saved["sd2_layout"]
    model, params = load_pretrained(model_dir, model_from_config, WEIGHTS_NAME)
    assert model_from_config(model_to_config(model)) == model
    save_pretrained(params, model_to_config(model), tmp_path, WEIGHTS_NAME)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    expected, got = reference.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    as_json = lambda config: json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))
    assert as_json(reloaded.config) == as_json(reference.config)
    x, t, text = inputs(CASES["sd2_layout"], TIMESTEPS["sd2_layout"])
    np.testing.assert_array_equal(torch_forward(reloaded, x, t, text), torch_forward(reference, x, t, text))


@pytest.mark.parametrize("config", [SD15_CONFIG, SD21_CONFIG], ids=["sd15", "sd21"])
def test_full_size_models_have_diffusers_parameter_count(config):
    with torch.device("meta"):
        expected = sum(p.numel() for p in UNet2DConditionModel.from_config(config).parameters())
    ours = sum(x.size for x in jax.tree_util.tree_leaves(param_shapes(model_from_config(config))))
    assert ours == expected
    assert expected == {64: 859_520_964, 96: 865_910_724}[config["sample_size"]]


def random_params(model: UNet2DCondition, seed: int = 0) -> dict:
    """Random parameters of ``model`` without running its init (whose random draws are slow to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
                                  param_shapes(model))


def test_channel_projection_starts_as_identity():
    plain = UNet2DCondition(**TINY)
    projected = plain.clone(channel_projection=True)
    flat = traverse_util.flatten_dict(random_params(plain))
    for path, shape in traverse_util.flatten_dict(param_shapes(projected)).items():
        if path not in flat:  # a projection, as its own init makes it
            x = jnp.zeros((1, 1, 1, shape.shape[-1]))
            flat[path] = ChannelProjection().init(jax.random.key(0), x)["params"]["kernel"]
    params = traverse_util.unflatten_dict(flat)
    weights = {k: v.shape for k, v in state_dict_from_params(params).items() if "channel_projection" in k}
    assert weights == {
        "down_blocks.0.channel_projection.weight": (16, 16, 1, 1),
        "down_blocks.1.channel_projection.weight": (32, 32, 1, 1),
        "mid_block.channel_projection.weight": (32, 32, 1, 1),
        "up_blocks.0.channel_projection.weight": (32, 32, 1, 1),
        "up_blocks.1.channel_projection.weight": (16, 16, 1, 1),
    }
    x, t, text = inputs(dict(TINY, sample_size=4), [10, 900])
    apply = lambda m, p: jax.jit(m.apply, compiler_options=FAST_COMPILE)({"params": p}, x, t, text)
    np.testing.assert_array_equal(apply(projected, params), apply(plain, random_params(plain)))
    assert model_to_config(projected)["channel_projection"] is True
    assert "channel_projection" not in model_to_config(plain)
    assert model_from_config(model_to_config(projected)) == projected


def test_remat_gives_the_same_outputs_and_gradients():
    """Equal up to float32 rounding: XLA fuses the recomputed forward pass differently."""
    model = UNet2DCondition(**ONE_LEVEL)
    params = random_params(model)
    x, t, text = inputs(dict(ONE_LEVEL, sample_size=4), [10, 900])

    def value_and_grad(m):
        loss = lambda p: jnp.mean(m.apply({"params": p}, x, t, text) ** 2)
        loss, grads = jax.jit(jax.value_and_grad(loss), compiler_options=FAST_COMPILE)(params)
        return loss, np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grads)])

    (loss, grads), (loss_remat, grads_remat) = value_and_grad(model), value_and_grad(model.clone(remat=True))
    assert rel_err(loss_remat, loss) <= 1e-6
    assert rel_err(grads_remat, grads) <= 1e-6


# --- bad input: each error names the key, its value and what is supported ------------------------------


@pytest.mark.parametrize("key,value,message", [
    ("addition_embed_type", "text_time", r"addition_embed_type='text_time' is not supported; supported values: None"),
    ("class_embed_type", "timestep", r"class_embed_type='timestep' is not supported"),
    ("attention_type", "gated", r"attention_type='gated' is not supported; supported values: 'default'"),
    ("some_future_option", 3, r"key 'some_future_option' \(= 3\) is not supported .* supported keys: sample_size"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 4, r"down_block_types contains \['SimpleCrossAttnDown"),
    ("attention_head_dim", [5, 10], r"attention_head_dim=\[5, 10\] is not supported; .* one integer per block"),
    ("cross_attention_dim", [768] * 4, r"cross_attention_dim=\[768, 768, 768, 768\] is not supported"),
])
def test_unsupported_configs_are_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        model_from_config(dict(SD15_CONFIG, **{key: value}))
