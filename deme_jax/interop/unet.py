"""diffusers ``UNet2DModel`` directories in and out.

A diffusers model directory holds ``config.json`` and
``diffusion_pytorch_model.safetensors``; a pipeline directory holds one in
``unet/``. Weights map onto the parameter tree as ``torch_layout`` says.
"""

from __future__ import annotations

import json
from pathlib import Path

from deme_jax.interop.torch_layout import (
    PICKLE_SUFFIXES, params_from_state_dict, pickle_message, read_config, read_state_dict, save_weights,
    weights_file,
)
from deme_jax.models import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, UNet2D, param_shapes

CLASS_NAME = "UNet2DModel"
MODEL_CLASS = UNet2D
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# diffusers config keys that map one-to-one onto UNet2D fields.
MODEL_KEYS = (
    "sample_size", "in_channels", "out_channels", "center_input_sample", "freq_shift", "flip_sin_to_cos",
    "down_block_types", "up_block_types", "block_out_channels", "layers_per_block", "mid_block_scale_factor",
    "downsample_padding", "dropout", "attention_head_dim", "norm_num_groups", "attn_norm_num_groups", "norm_eps",
    "add_attention", "time_embedding_dim",
)
# diffusers config keys whose other values select layers UNet2D does not have.
FIXED_KEYS = {
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D",),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
}
IGNORED_KEYS = ("num_train_timesteps",)  # only read by the "learned" time embedding
# Written only when true: DeMe's 1x1 channel projections, weights "<block>.channel_projection.weight".
PROJECTION_KEY = "channel_projection"

# google/ddpm-cifar10-32's UNet: the 35,746,307-parameter DDPM of Ho et al. on CIFAR-10.
DDPM_CIFAR10_CONFIG = {
    "sample_size": 32, "block_out_channels": [128, 256, 256, 256], "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-6, "attention_head_dim": None,
}

def model_from_config(config: dict) -> UNet2D:
    """Builds the UNet2D a diffusers ``config.json`` describes, refusing what it cannot express."""
    for key, value in config.items():
        if key.startswith("_") or key in MODEL_KEYS or key in IGNORED_KEYS or key == PROJECTION_KEY:
            continue
        if key not in FIXED_KEYS:
            raise ValueError(f"UNet config key {key!r} (= {value!r}) is not supported by deme_jax's UNet2D; "
                             f"supported keys: {', '.join(MODEL_KEYS + tuple(FIXED_KEYS))}.")
        if value not in FIXED_KEYS[key]:
            raise ValueError(f"UNet config {key}={value!r} is not supported; supported values: "
                             f"{', '.join(map(repr, FIXED_KEYS[key]))}. Only diffusers' DDPM UNet2DModel "
                             "layout (positional time embedding, conv up/down sampling) can be loaded.")
    fields = {k: config[k] for k in MODEL_KEYS if k in config}
    for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        bad = [b for b in fields.get(key, ()) if b not in allowed]
        if bad:
            raise ValueError(f"UNet config {key} contains {bad}; supported block types: {', '.join(allowed)}.")
    if fields.get("norm_num_groups", 32) is None:
        raise ValueError("UNet config norm_num_groups=None is not supported; set it to an integer such as 32.")
    for key in ("down_block_types", "up_block_types", "block_out_channels", "sample_size"):
        if isinstance(fields.get(key), list):
            fields[key] = tuple(fields[key])
    n = len(fields.get("block_out_channels", UNet2D.block_out_channels))
    for key in ("down_block_types", "up_block_types"):
        if len(fields.get(key, getattr(UNet2D, key))) != n:
            raise ValueError(f"UNet config {key} has {len(fields[key])} entries but block_out_channels has {n}; "
                             "give one block type per resolution level.")
    return UNet2D(**fields, channel_projection=bool(config.get(PROJECTION_KEY, False)))


def model_to_config(model: UNet2D) -> dict:
    """The diffusers ``config.json`` of a UNet2D."""
    config = {"_class_name": "UNet2DModel"}
    for key in MODEL_KEYS:
        value = getattr(model, key)
        config[key] = list(value) if isinstance(value, tuple) else value
    config.update({key: values[0] for key, values in FIXED_KEYS.items()})
    if model.channel_projection:
        config[PROJECTION_KEY] = True
    return config


def resolve_model_dir(path: str | Path) -> Path:
    """The directory holding the UNet's config.json: the path itself or its ``unet/``."""
    path = Path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise ValueError(pickle_message(path, WEIGHTS_NAME))
    for candidate in (path, path / "unet"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"No diffusers UNet found at {path}: expected {path / CONFIG_NAME} (a model directory) or "
        f"{path / 'unet' / CONFIG_NAME} (a pipeline directory), beside {WEIGHTS_NAME}."
    )


def load_diffusers_unet(path: str | Path) -> tuple[UNet2D, dict]:
    """Reads a diffusers UNet2DModel (model or pipeline directory) as ``(model, params)``."""
    model_dir = resolve_model_dir(path)
    config = read_config(model_dir / CONFIG_NAME)
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{model_dir / CONFIG_NAME} describes a {config['_class_name']}; only UNet2DModel is "
                         "supported.")
    model = model_from_config(config)
    state_dict = read_state_dict(weights_file(model_dir, WEIGHTS_NAME))
    return model, params_from_state_dict(param_shapes(model), state_dict)


def save_diffusers_unet(model: UNet2D, params: dict, path: str | Path) -> Path:
    """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` that diffusers loads.

    A model with DeMe's channel projections adds ``"channel_projection": true``
    to config.json and one ``(C, C, 1, 1)`` tensor per projection
    (``down_blocks.0.channel_projection.weight``, ..., ``mid_block.``,
    ``up_blocks.i.``), applied to the block's output. deme_jax reads them back;
    diffusers' ``UNet2DModel`` has no such layers and would only warn that the
    weights went unused, so such a directory is for deme_jax (or a UNet2DModel
    subclass that applies them), not for stock diffusers.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_weights(params, path / WEIGHTS_NAME)
    (path / CONFIG_NAME).write_text(json.dumps(model_to_config(model), indent=2) + "\n")
    return path

