"""diffusers ``AutoencoderKL`` config.json <-> ``AutoencoderKL`` fields.

Weights go through ``torch_layout``: ``load_pretrained(model_dir,
model_from_config, WEIGHTS_NAME)`` reads a model directory (a pipeline's
``vae/``), ``save_pretrained(params, model_to_config(model), path, WEIGHTS_NAME)``
writes one that diffusers' ``AutoencoderKL.from_pretrained`` loads.
"""

from __future__ import annotations

from deme_jax.models.autoencoder import AutoencoderKL

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "AutoencoderKL"
MODEL_CLASS = AutoencoderKL

# diffusers config keys, each an AutoencoderKL field of the same name; the module refuses values it cannot compute.
MODEL_KEYS = (
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
    "act_fn", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor", "shift_factor", "latents_mean",
    "latents_std", "force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
)


def model_from_config(config: dict) -> AutoencoderKL:
    """Builds the AutoencoderKL a diffusers ``config.json`` describes, refusing what it cannot express."""
    class_name = config.get("_class_name", CLASS_NAME)
    if class_name != CLASS_NAME:
        raise ValueError(f"VAE config _class_name={class_name!r} is not supported; only {CLASS_NAME!r} is.")
    for key, value in config.items():
        if not key.startswith("_") and key not in MODEL_KEYS:
            raise ValueError(f"VAE config key {key!r} (= {value!r}) is not supported by deme_jax's AutoencoderKL; "
                             f"supported keys: {', '.join(MODEL_KEYS)}.")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in MODEL_KEYS}
    return AutoencoderKL(**fields)


def model_to_config(model: AutoencoderKL) -> dict:
    """The diffusers ``config.json`` of an AutoencoderKL."""
    config = {"_class_name": CLASS_NAME}
    for key in MODEL_KEYS:
        value = getattr(model, key)
        config[key] = list(value) if isinstance(value, tuple) else value
    return config
