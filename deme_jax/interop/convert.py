"""``deme convert``: one entry point for every format a UNet can be in."""

from __future__ import annotations

from pathlib import Path

from deme_jax.interop.checkpoint import is_orbax_model, save_orbax_unet
from deme_jax.interop.load import load_model
from deme_jax.interop.torch_pickle import convert_pickle_to_safetensors
from deme_jax.interop.unet import PICKLE_SUFFIXES, save_diffusers_unet


def convert(src: str | Path, dst: str | Path) -> Path:
    """diffusers directory or training workdir (its EMA weights) -> orbax checkpoint, orbax checkpoint ->
    diffusers directory, PyTorch pickle -> safetensors file (through PyTorch's weights_only loader)."""
    src = Path(src)
    if src.suffix in PICKLE_SUFFIXES:
        return convert_pickle_to_safetensors(src, dst)
    save = save_diffusers_unet if is_orbax_model(src) else save_orbax_unet
    return save(*load_model(src), dst)
