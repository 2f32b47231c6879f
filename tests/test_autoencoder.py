"""AutoencoderKL against diffusers' AutoencoderKL on the same weights and inputs.

Tolerance: relative L2 error <= 1e-5 in float32, as for the UNet: the same
float32 arithmetic in a different order gives ~3e-7 (encoder) to ~3e-6
(decoder, as far as diffusers' own float32 output is from its float64 one),
a wrong mapping (a swapped scale/bias, a transposed kernel) errors of order 1.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from deme_jax.interop.autoencoder import WEIGHTS_NAME, model_from_config, model_to_config
from deme_jax.interop.torch_layout import load_pretrained, save_pretrained
from deme_jax.models import param_shapes
from deme_jax.models.autoencoder import DiagonalGaussian

pytestmark = pytest.mark.reference

# Stable Diffusion's VAE layout (4 levels, 2 resnets per block, 4 latent channels) at small widths.
SD_LAYOUT = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=2, latent_channels=4)
CASES = {
    "sd_layout": dict(SD_LAYOUT, block_out_channels=(8, 16, 16, 32), norm_num_groups=4, sample_size=32),
    "no_mid_attention_no_quant_conv": dict(SD_LAYOUT, block_out_channels=(8, 8, 16, 16), norm_num_groups=8,
                                           sample_size=32, mid_block_add_attention=False, use_quant_conv=False),
}
# CompVis/stable-diffusion-v1-4's vae/config.json.
SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.2.2", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def random_vae(config, seed=0) -> TorchAutoencoderKL:
    """A diffusers AutoencoderKL whose norm scales and biases are random too, so no mapping error hides."""
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x):
    return x.permute(0, 2, 3, 1).numpy()


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    latents = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    return images, latents


@pytest.fixture(scope="module", params=CASES)
def pair(request, tmp_path_factory):
    """(diffusers model, our model and params loaded from its ``save_pretrained`` directory)."""
    reference = random_vae(CASES[request.param])
    model_dir = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(model_dir)
    return reference, *load_pretrained(model_dir, model_from_config, WEIGHTS_NAME)


def test_matches_diffusers(pair):
    reference, model, params = pair
    images, latents = inputs()
    variables = {"params": params}
    posterior = model.apply(variables, images, method="encode")
    ours_decoded = model.apply(variables, latents, method="decode")
    ours_forward = model.apply(variables, images)
    with torch.no_grad():
        expected = reference.encode(nchw(images)).latent_dist
        decoded = reference.decode(nchw(latents)).sample
        forward = reference(nchw(images)).sample
    assert rel_err(posterior.mean, nhwc(expected.mean)) <= 1e-5
    assert rel_err(posterior.logvar, nhwc(expected.logvar)) <= 1e-5
    assert rel_err(ours_decoded, nhwc(decoded)) <= 1e-5
    assert rel_err(ours_forward, nhwc(forward)) <= 1e-5
    assert ours_decoded.dtype == jnp.float32


def test_round_trip_through_diffusers(pair, tmp_path):
    reference, model, params = pair
    save_pretrained(params, model_to_config(model), tmp_path, WEIGHTS_NAME)
    reloaded = TorchAutoencoderKL.from_pretrained(tmp_path)
    expected, got = reference.state_dict(), reloaded.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    as_json = lambda config: json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))
    assert as_json(reloaded.config) == as_json(reference.config)
    images = nchw(inputs()[0])
    with torch.no_grad():
        assert torch.equal(reloaded(images).sample, reference(images).sample)
    again = load_pretrained(tmp_path, model_from_config, WEIGHTS_NAME)[1]
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_fp16_variant_loads(pair, tmp_path):
    reference, _, params = pair
    copy.deepcopy(reference).half().save_pretrained(tmp_path, variant="fp16")
    halved = load_pretrained(tmp_path, model_from_config, WEIGHTS_NAME, variant="fp16")[1]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(halved))
    rounded = jax.tree.map(lambda x: np.asarray(x, np.float16).astype(np.float32), params)
    jax.tree.map(np.testing.assert_array_equal, halved, rounded)


def test_remat_gives_the_same_values_and_gradients():
    model = model_from_config(dict(block_out_channels=(8,), norm_num_groups=4))  # one level: every kind of block
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32), param_shapes(model))
    images = inputs()[0][:, :8, :8]
    value_and_grad = lambda m: jax.value_and_grad(lambda p: jnp.mean(m.apply({"params": p}, images) ** 2))
    plain, remat = jax.jit(lambda p: (value_and_grad(model)(p), value_and_grad(model.clone(remat=True))(p)))(params)
    jax.tree.map(np.testing.assert_array_equal, remat, plain)


def test_diagonal_gaussian():
    rng = np.random.default_rng(0)
    moments = jnp.asarray(rng.standard_normal((2, 3, 3, 8)) * 20, jnp.float32)
    posterior = DiagonalGaussian.from_moments(moments)
    np.testing.assert_array_equal(posterior.mean, moments[..., :4])
    np.testing.assert_array_equal(posterior.logvar, np.clip(moments[..., 4:], -30, 20))
    np.testing.assert_allclose(posterior.std ** 2, posterior.var, rtol=1e-6)
    key = jax.random.key(3)
    expected = posterior.mean + posterior.std * jax.random.normal(key, posterior.mean.shape)
    np.testing.assert_array_equal(posterior.sample(key), expected)
    np.testing.assert_array_equal(posterior.mode(), posterior.mean)
    # 8000 draws of N(1.5, 0.5^2).
    wide = DiagonalGaussian(jnp.full((4000, 1, 1, 2), 1.5), jnp.full((4000, 1, 1, 2), np.log(0.25)))
    draws = np.asarray(wide.sample(jax.random.key(0)))
    np.testing.assert_allclose(draws.mean(), 1.5, atol=0.02)
    np.testing.assert_allclose(draws.std(), 0.5, atol=0.02)


def test_sd_vae_has_diffusers_parameter_count():
    with torch.device("meta"):
        expected = sum(p.numel() for p in TorchAutoencoderKL.from_config(SD_VAE_CONFIG).parameters())
    ours = sum(x.size for x in jax.tree.leaves(param_shapes(model_from_config(SD_VAE_CONFIG))))
    assert ours == expected == 83_653_863


@pytest.mark.parametrize("key,value,message", [
    ("some_future_option", 3, r"key 'some_future_option' \(= 3\) is not supported"),
    ("act_fn", "gelu", r"act_fn='gelu' is not supported; supported: 'silu', 'swish'"),
    ("down_block_types", ["AttnDownEncoderBlock2D"] * 4, r"down_block_types=\('AttnDownEncoderBlock2D'"),
    ("_class_name", "AutoencoderTiny", r"_class_name='AutoencoderTiny' is not supported"),
])
def test_unsupported_config_values(key, value, message):
    with pytest.raises(ValueError, match=message):
        model_from_config(dict(SD_VAE_CONFIG, **{key: value}))


def test_config_round_trip():
    model = model_from_config(SD_VAE_CONFIG)
    assert model_from_config(model_to_config(model)) == model
