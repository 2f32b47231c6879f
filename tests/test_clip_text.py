"""CLIPTextModel against transformers' CLIPTextModel on the same random weights and token ids.

Tolerance: relative L2 error <= 1e-5 in float32, as for the UNet: the same float32
arithmetic in a different order differs by ~1e-7 relative, a wrong mapping (a
transposed kernel, a swapped scale/bias, a missing causal mask) by order 1.
"""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from deme_jax.interop import torch_layout
from deme_jax.interop.clip_text import (
    IGNORED_WEIGHTS, KEY_PREFIX, WEIGHTS_NAME, model_from_config, model_to_config,
)
from deme_jax.interop.diffusers import load_diffusers_model
from deme_jax.models import param_shapes

pytestmark = pytest.mark.reference

SMALL = dict(vocab_size=1000, hidden_size=48, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=77, bos_token_id=998, pad_token_id=1)
CASES = {
    # SD 1.x: OpenAI CLIP, pads with the end token; eos_token_id 2 is the legacy "argmax of the ids" pooling.
    "sd1_quick_gelu": dict(SMALL, hidden_act="quick_gelu", eos_token_id=2),
    # SD 2.x: OpenCLIP, pads with "!" (id 0); the pooled state is at the first end token.
    "sd2_gelu": dict(SMALL, hidden_act="gelu", eos_token_id=999),
    "gelu_new_attention_mask": dict(SMALL, hidden_act="gelu_new", eos_token_id=999),
}
END = 999
# Text encoder configs of the Stable Diffusion releases, as their text_encoder/config.json gives them.
SD15_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
    "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}
SD21_CONFIG = dict(SD15_CONFIG, _name_or_path="stabilityai/stable-diffusion-2-1", hidden_act="gelu", hidden_size=1024,
                   intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, projection_dim=512,
                   transformers_version="4.25.0.dev0")


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def random_clip_text(seed=0, **config) -> transformers.CLIPTextModel:
    """Every parameter random, layer norms included, so that a swapped scale/bias or a skipped norm shows."""
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = p.shape[-1] ** -0.5 if p.ndim == 2 else 0.1
            p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def token_ids(pad: int, lengths=(3, 20, 75), total=77, seed=0) -> np.ndarray:
    """<start> text <end> padding, as the tokenizer writes them (the longest one fills all 77 positions)."""
    rng = np.random.default_rng(seed)
    rows = [[998, *rng.integers(3, 998, n), END] + [pad] * (total - n - 2) for n in lengths]
    return np.array(rows, dtype=np.int32)


def reference_outputs(model, ids, mask=None):
    with torch.no_grad():
        out = model(torch.as_tensor(ids, dtype=torch.long), attention_mask=None if mask is None else torch.as_tensor(
            mask), output_hidden_states=True)
    return out.last_hidden_state.numpy(), out.pooler_output.numpy(), [h.numpy() for h in out.hidden_states]


def assert_close(ours, reference):
    last, pooled, hidden = reference
    assert len(ours.hidden_states) == len(hidden)
    assert rel_err(ours.last_hidden_state, last) <= 1e-5
    assert rel_err(ours.pooler_output, pooled) <= 1e-5
    assert rel_err(ours.hidden_states[-2], hidden[-2]) <= 1e-5  # what diffusers' clip_skip=1 conditions on
    for a, b in zip(ours.hidden_states, hidden):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_transformers(name, tmp_path):
    config = CASES[name]
    reference = random_clip_text(**config)
    reference.save_pretrained(tmp_path)
    model, params = load_diffusers_model(tmp_path)
    ids = token_ids(pad=END if config["hidden_act"] == "quick_gelu" else 0)
    mask = None
    if name.endswith("attention_mask"):  # 1 up to the end token, 0 on the padding
        mask = (np.arange(ids.shape[1]) <= np.argmax(ids == END, axis=1)[:, None]).astype(np.int32)
    ours = jax.jit(model.apply)({"params": params}, ids, mask)
    assert_close(ours, reference_outputs(reference, ids, mask))


def test_round_trip_through_transformers(tmp_path):
    reference = random_clip_text(**CASES["sd2_gelu"])
    reference.save_pretrained(tmp_path / "reference")
    model, params = load_diffusers_model(tmp_path / "reference")
    torch_layout.save_pretrained(params, model_to_config(model), tmp_path / "ours", WEIGHTS_NAME)
    assert all(key.startswith(KEY_PREFIX) for key in load_file(tmp_path / "ours" / WEIGHTS_NAME))
    reloaded, info = transformers.CLIPTextModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info.values()), info
    expected = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert reloaded.state_dict().keys() == expected.keys()
    for key, value in reloaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), expected[key])
    ids = token_ids(pad=0)
    assert_close(model.apply({"params": params}, ids), reference_outputs(reloaded.eval(), ids))


def test_stable_diffusion_checkpoint_layout(tmp_path):
    """SD releases were saved by transformers 4: keys under ``text_model.``, some with the position_ids buffer."""
    reference = random_clip_text(**CASES["sd1_quick_gelu"])
    reference.save_pretrained(tmp_path)
    _, params = load_diffusers_model(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    state = {KEY_PREFIX + k: v for k, v in load_file(weights).items()}
    state[IGNORED_WEIGHTS[0]] = np.arange(77, dtype=np.int64)[None]
    save_file(state, weights, metadata={"format": "pt"})
    for _, loaded in (load_diffusers_model(tmp_path),
                      torch_layout.load_pretrained(tmp_path, model_from_config, WEIGHTS_NAME, IGNORED_WEIGHTS)):
        flat, want = traverse_util.flatten_dict(loaded), traverse_util.flatten_dict(params)
        assert flat.keys() == want.keys()
        for path, value in flat.items():
            np.testing.assert_array_equal(value, want[path])


@pytest.mark.parametrize("config, count", [pytest.param(SD15_CONFIG, 123_060_480, id="sd15"),
                                           pytest.param(SD21_CONFIG, 340_387_840, id="sd21")])
def test_parameter_count_of_stable_diffusion_text_encoders(config, count):
    with torch.device("meta"):
        reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    expected = sum(p.numel() for p in reference.parameters())
    ours = sum(x.size for x in jax.tree_util.tree_leaves(param_shapes(model_from_config(config))))
    assert ours == expected == count


def test_config_round_trip():
    model = model_from_config(SD21_CONFIG)
    assert model_from_config(model_to_config(model)) == model
    assert transformers.CLIPTextConfig(**model_to_config(model)).to_dict()["hidden_act"] == "gelu"


@pytest.mark.parametrize("key, value, match", [
    ("text_config", {}, "'text_config'"),
    ("hidden_act", "relu", "hidden_act='relu'"),
    ("architectures", ["CLIPTextModelWithProjection"], "CLIPTextModelWithProjection"),
])
def test_unsupported_config(key, value, match):
    with pytest.raises(ValueError, match=match):
        model_from_config(dict(SD15_CONFIG, **{key: value}))
