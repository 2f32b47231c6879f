"""``deme convert``: one entry point for every format a model can be in."""

from __future__ import annotations

from pathlib import Path

from deme_jax.interop.checkpoint import is_orbax_model, save_orbax_model
from deme_jax.interop.diffusers import save_diffusers_model
from deme_jax.interop.load import load_model
from deme_jax.interop.torch_layout import PICKLE_SUFFIXES
from deme_jax.interop.torch_pickle import convert_pickle_to_safetensors


def convert(src: str | Path, dst: str | Path) -> Path:
    """diffusers/transformers model directory (UNet2DModel, UNet2DConditionModel, AutoencoderKL, CLIPTextModel)
    or training workdir (its EMA weights) -> orbax checkpoint, orbax checkpoint -> that directory again, PyTorch
    pickle -> safetensors file (through PyTorch's weights_only loader)."""
    src = Path(src)
    if src.suffix in PICKLE_SUFFIXES:
        return convert_pickle_to_safetensors(src, dst)
    save = save_diffusers_model if is_orbax_model(src) else save_orbax_model
    return save(*load_model(src), dst)
