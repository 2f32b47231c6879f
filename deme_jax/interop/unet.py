"""diffusers ``UNet2DModel`` directories in and out.

A diffusers model directory holds ``config.json`` and
``diffusion_pytorch_model.safetensors``; a pipeline directory holds one in
``unet/``. PyTorch keys map onto our parameter tree mechanically:
``down_blocks.0.attentions.1.to_out.0.weight`` is
``("down_blocks_0", "attentions_1", "to_out_0", "kernel")``, convolutions are
OIHW there and HWIO here, linear weights (out, in) there and (in, out) here.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from deme_jax.models import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, UNet2D, param_shapes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

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

# Module lists, "name.N" in PyTorch and "name_N" here.
LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out")
# Attention names of checkpoints saved before diffusers 0.14.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


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


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """``down_blocks.0.attentions.1.query.weight`` -> ``(down_blocks_0, attentions_1, to_q, weight)``."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in LEGACY_ATTENTION_NAMES:
        parts = parts[:-2] + LEGACY_ATTENTION_NAMES[parts[-2]].split(".") + parts[-1:]
    path = []
    for part in parts:
        if part.isdigit() and path and path[-1] in LIST_NAMES:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def path_to_torch_key(path: tuple[str, ...]) -> str:
    parts = []
    for part in path:
        name, _, index = part.rpartition("_")
        parts.append(f"{name}.{index}" if name in LIST_NAMES and index.isdigit() else part)
    return ".".join(parts)


def torch_to_flax(array: np.ndarray) -> np.ndarray:
    """OIHW -> HWIO for convolutions, (out, in) -> (in, out) for linear layers."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array.T if array.ndim == 2 else array


def flax_to_torch(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array.T if array.ndim == 2 else array


def flax_leaf_name(torch_name: str, ndim: int) -> str:
    if torch_name == "weight":
        return "kernel" if ndim > 1 else "scale"
    return torch_name


def resolve_model_dir(path: str | Path) -> Path:
    """The directory holding the UNet's config.json: the path itself or its ``unet/``."""
    path = Path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise ValueError(pickle_message(path))
    for candidate in (path, path / "unet"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"No diffusers UNet found at {path}: expected {path / CONFIG_NAME} (a model directory) or "
        f"{path / 'unet' / CONFIG_NAME} (a pipeline directory), beside {WEIGHTS_NAME}."
    )


def pickle_message(path: Path) -> str:
    target = path.with_name(WEIGHTS_NAME) if path.name.startswith("diffusion_pytorch_model") else path.with_suffix(
        ".safetensors")
    return (f"{path} is a pickle file, which deme_jax never unpickles: it can run arbitrary code. Convert it once "
            f"to safetensors with `deme convert {path} {target}` (PyTorch's weights_only loader), then load again.")


def read_state_dict(model_dir: Path) -> dict[str, np.ndarray]:
    weights = model_dir / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [p for p in sorted(model_dir.iterdir()) if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise ValueError(pickle_message(pickles[0]))
        raise FileNotFoundError(f"{weights} is missing: a diffusers model directory holds {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME} (save one with UNet2DModel.save_pretrained).")
    try:
        return load_file(weights)
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{weights} is not a readable safetensors file ({err}); re-export it.") from err


def params_from_state_dict(model: UNet2D, state_dict: dict[str, np.ndarray]) -> dict:
    """Maps a PyTorch state dict onto the model's parameter tree, checking every key and shape."""
    expected = traverse_util.flatten_dict(param_shapes(model))
    flat, unexpected = {}, []
    for key, array in state_dict.items():
        path = torch_key_to_path(key)
        path = path[:-1] + (flax_leaf_name(path[-1], array.ndim),)
        if path not in expected:
            unexpected.append(key)
            continue
        value = torch_to_flax(array)
        if value.shape != expected[path].shape:
            want = flax_to_torch(np.empty(expected[path].shape)).shape
            raise ValueError(f"Shape mismatch for {key}: the checkpoint has {tuple(array.shape)}, the model from "
                             f"config.json expects {want}. The weights and config.json do not belong together.")
        flat[path] = jnp.asarray(value, dtype=expected[path].dtype)
    missing = [path_to_torch_key(p) for p in expected if p not in flat]
    if unexpected or missing:
        raise ValueError(f"Checkpoint keys do not match the model from config.json: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}.")
    return traverse_util.unflatten_dict(flat)


def load_diffusers_unet(path: str | Path) -> tuple[UNet2D, dict]:
    """Reads a diffusers UNet2DModel (model or pipeline directory) as ``(model, params)``."""
    model_dir = resolve_model_dir(path)
    try:
        config = json.loads((model_dir / CONFIG_NAME).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{model_dir / CONFIG_NAME} is not valid JSON ({err}).") from err
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{model_dir / CONFIG_NAME} describes a {config['_class_name']}; only UNet2DModel is "
                         "supported.")
    model = model_from_config(config)
    return model, params_from_state_dict(model, read_state_dict(model_dir))


def state_dict_from_params(params: dict) -> dict[str, np.ndarray]:
    return {
        path_to_torch_key(path[:-1] + ("weight" if path[-1] in ("kernel", "scale") else path[-1],)):
            np.ascontiguousarray(flax_to_torch(np.asarray(value)))
        for path, value in traverse_util.flatten_dict(params).items()
    }


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
    save_file(state_dict_from_params(params), path / WEIGHTS_NAME, metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(model_to_config(model), indent=2) + "\n")
    return path

