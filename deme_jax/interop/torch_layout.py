"""PyTorch state dicts <-> Flax parameter trees, for every model diffusers or transformers saves.

Keys map mechanically: ``down_blocks.0.attentions.1.to_out.0.weight`` is
``("down_blocks_0", "attentions_1", "to_out_0", "kernel")``. A PyTorch
``weight`` is a Flax ``kernel`` (convolutions OIHW there, HWIO here; linear
weights (out, in) there, (in, out) here), a norm's ``scale`` or an embedding
table (the same layout on both sides); which one is read off the model's own
parameter tree, so no model lists its layers here.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from deme_jax.models import param_shapes

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Module lists, "name.N" in PyTorch and "name_N" here.
LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out",
              "transformer_blocks", "net", "layers")
# Attention names of checkpoints saved before diffusers 0.14.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
WEIGHT_LEAVES = ("kernel", "scale", "embedding")


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
    if parts[-1] in WEIGHT_LEAVES:
        parts[-1] = "weight"
    return ".".join(parts)


def torch_to_flax(array: np.ndarray, leaf: str) -> np.ndarray:
    """OIHW -> HWIO for convolution kernels, (out, in) -> (in, out) for linear kernels."""
    if leaf != "kernel":
        return array
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T


def flax_to_torch(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf != "kernel":
        return array
    return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T


def pickle_message(path: Path, weights_name: str) -> str:
    target = path.with_name(weights_name) if path.stem == Path(weights_name).stem else path.with_suffix(
        ".safetensors")
    return (f"{path} is a pickle file, which deme_jax never unpickles: it can run arbitrary code. Convert it once "
            f"to safetensors with `deme convert {path} {target}` (PyTorch's weights_only loader), then load again.")


def read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from err


def weights_file(model_dir: Path, weights_name: str, variant: str | None = None) -> Path:
    """``model_dir/weights_name``, or its ``variant`` (``diffusion_pytorch_model.fp16.safetensors``)."""
    name = Path(weights_name)
    weights = model_dir / (f"{name.stem}.{variant}{name.suffix}" if variant else weights_name)
    if weights.is_file():
        return weights
    if variant is None:  # a directory saved with variant="fp16" only
        variants = sorted(model_dir.glob(f"{name.stem}.*{name.suffix}"))
        if len(variants) == 1:
            return variants[0]
    pickles = [p for p in sorted(model_dir.iterdir()) if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(pickle_message(pickles[0], weights_name))
    if any(model_dir.glob(f"{name.stem}*.index.json")):
        raise ValueError(f"{model_dir} holds sharded weights ({name.stem}*.index.json); save the model again "
                         "with a max_shard_size above its size, so one safetensors file holds it.")
    raise FileNotFoundError(f"{weights} is missing: a model directory holds config.json and {weights.name} "
                            "(save one with the model's save_pretrained).")


def read_state_dict(weights: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(weights)
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{weights} is not a readable safetensors file ({err}); re-export it.") from err


def params_from_state_dict(shapes: dict, state_dict: dict[str, np.ndarray], ignored: tuple[str, ...] = (),
                           dtype=None) -> dict:
    """Maps a PyTorch state dict onto a parameter tree of ``shapes`` (``jax.eval_shape`` of the model's init),
    checking every key and shape. Keys in ``ignored`` (buffers such as ``position_ids``) are skipped; the
    values keep the model's dtype unless ``dtype`` is given (None: the model's)."""
    expected = traverse_util.flatten_dict(shapes)
    flat, unexpected = {}, []
    for key, array in state_dict.items():
        if key in ignored:
            continue
        path = torch_key_to_path(key)
        if path[-1] == "weight":
            path = next((path[:-1] + (leaf,) for leaf in WEIGHT_LEAVES if path[:-1] + (leaf,) in expected), path)
        if path not in expected:
            unexpected.append(key)
            continue
        value = torch_to_flax(array, path[-1])
        if value.shape != expected[path].shape:
            want = flax_to_torch(np.empty(expected[path].shape), path[-1]).shape
            raise ValueError(f"Shape mismatch for {key}: the checkpoint has {tuple(array.shape)}, the model from "
                             f"config.json expects {want}. The weights and config.json do not belong together.")
        flat[path] = jnp.asarray(value, dtype=dtype or expected[path].dtype)
    missing = [path_to_torch_key(p) for p in expected if p not in flat]
    if unexpected or missing:
        raise ValueError(f"Checkpoint keys do not match the model from config.json: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}.")
    return traverse_util.unflatten_dict(flat)


def state_dict_from_params(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    return {
        prefix + path_to_torch_key(path): np.asarray(flax_to_torch(np.asarray(value), path[-1]), order="C")
        for path, value in traverse_util.flatten_dict(params).items()
    }


def save_weights(params: dict, weights: Path, prefix: str = "") -> None:
    save_file(state_dict_from_params(jax.device_get(params), prefix), weights, metadata={"format": "pt"})


def load_pretrained(model_dir: Path, model_from_config, weights_name: str, ignored: tuple[str, ...] = (),
                    variant: str | None = None, key_prefix: str = "", config_name: str = "config.json"):
    """``(module, params)`` of a ``save_pretrained`` directory: ``model_from_config(config.json)`` and its
    safetensors weights (``variant`` such as "fp16" picks ``<weights>.fp16.safetensors``), float32 params.
    Keys lacking ``key_prefix`` get it (a layout that one library version writes with it, another without)."""
    model = model_from_config(read_config(Path(model_dir) / config_name))
    state_dict = read_state_dict(weights_file(Path(model_dir), weights_name, variant))
    state_dict = {k if k.startswith(key_prefix) else key_prefix + k: v for k, v in state_dict.items()}
    return model, params_from_state_dict(param_shapes(model), state_dict, ignored)


def save_pretrained(params: dict, config: dict, path: Path, weights_name: str, variant: str | None = None,
                    config_name: str = "config.json") -> Path:
    """Writes ``config.json`` and the safetensors weights as ``save_pretrained`` lays them out; ``variant``
    "fp16" stores the weights in half precision under ``<weights>.fp16.safetensors``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    name = Path(weights_name)
    if variant:
        if variant != "fp16":
            raise ValueError(f"variant={variant!r}: only 'fp16' is written.")
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float16), params)
        weights_name = f"{name.stem}.{variant}{name.suffix}"
    save_weights(params, path / weights_name)
    (path / config_name).write_text(json.dumps(config, indent=2) + "\n")
    return path
