"""UNet LoRA adapters (``deme_jax.models.lora``) in and out of the diffusers/peft safetensors layout.

The file is what diffusers' ``save_lora_weights`` writes for a UNet, and what
``StableDiffusionPipeline.load_lora_weights(directory)`` (or ``UNet2DConditionModel.load_lora_adapter(directory,
prefix="unet", use_safetensors=True)``) loads when peft is installed: ``unet.<module>.lora_A.weight`` and ``lora_B.weight`` in
PyTorch's layout (linear ``(out, in)``, convolutions OIHW), and in the header the peft ``LoraConfig`` (``r``,
``lora_alpha = scale * r``, ``target_modules``) under ``lora_adapter_metadata``, its keys prefixed ``unet.``.
Adapters of DeMe's channel projections are written too; stock diffusers has no such modules: it loads the others
and warns that it skipped those keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from deme_jax.interop.torch_layout import read_state_dict, state_dict_from_params, torch_key_to_path, torch_to_flax

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
PREFIX = "unet."
METADATA_KEY = "lora_adapter_metadata"
SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# LoraConfig fields that give modules their own rank or scale, or another kind of adapter: not read here.
UNSUPPORTED_CONFIG = ("rank_pattern", "alpha_pattern", "use_rslora", "use_dora")


def save_lora(lora_params: dict, path: str | Path, scale: float) -> Path:
    """Writes ``path/pytorch_lora_weights.safetensors`` for adapters made by ``init_lora`` and applied with
    ``scale``; returns the directory."""
    state_dict = state_dict_from_params(jax.device_get(lora_params), PREFIX)
    ranks = {v.shape[0] for k, v in state_dict.items() if k.endswith(SUFFIXES[0])}
    if len(ranks) != 1:
        raise ValueError(f"lora_params has ranks {sorted(ranks)}: save adapters of one rank, as init_lora makes.")
    rank = ranks.pop()
    modules = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in state_dict})
    config = {"r": rank, "lora_alpha": float(scale) * rank, "target_modules": modules}
    metadata = {"format": "pt", METADATA_KEY: json.dumps({PREFIX + k: v for k, v in config.items()})}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, path / WEIGHTS_NAME, metadata=metadata)
    return path


def load_lora(path: str | Path) -> tuple[dict, float]:
    """``(lora_params, scale)`` of a LoRA directory or file in the layout above (float32 adapters). Without
    a config in the header, scale is 1 (alpha = r), as diffusers reads such files."""
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: save LoRA weights with save_lora (or diffusers' "
                                "save_lora_weights).")
    state_dict = read_state_dict(weights)
    foreign = [k for k in state_dict if not (k.startswith(PREFIX) and k.endswith(SUFFIXES))]
    if foreign or not state_dict:
        raise ValueError(f"{weights} is not UNet LoRA weights in the diffusers/peft layout (keys "
                         f"unet.<module>.lora_A.weight and lora_B.weight); it holds {foreign[:4] or 'no tensors'}.")
    with safe_open(weights, "numpy") as f:
        header = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    config = {k[len(PREFIX):]: v for k, v in header.items() if k.startswith(PREFIX)}
    unsupported = [k for k in UNSUPPORTED_CONFIG if config.get(k)]
    if unsupported:
        raise ValueError(f"{weights} sets {unsupported} in its LoRA config: only one rank and scale for every "
                         "module, plain LoRA, is read.")
    flat = {torch_key_to_path(k[len(PREFIX):])[:-1] + ("kernel",): jnp.asarray(torch_to_flax(v, "kernel"), jnp.float32)
            for k, v in state_dict.items()}
    scale = config["lora_alpha"] / config["r"] if config else 1.0
    return traverse_util.unflatten_dict(flat), scale
