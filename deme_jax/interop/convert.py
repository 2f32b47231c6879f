"""``deme convert``: one entry point for every format a UNet can be in."""

from __future__ import annotations

from pathlib import Path

from deme_jax.interop.checkpoint import is_orbax_model, load_orbax_unet, save_orbax_unet
from deme_jax.interop.torch_pickle import convert_pickle_to_safetensors
from deme_jax.interop.unet import PICKLE_SUFFIXES, load_diffusers_unet, save_diffusers_unet
from deme_jax.models import UNet2D


def load_unet(path: str | Path) -> tuple[UNet2D, dict]:
    """Reads a UNet from an orbax checkpoint of ours or a diffusers model/pipeline directory."""
    return load_orbax_unet(path) if is_orbax_model(path) else load_diffusers_unet(path)


def convert(src: str | Path, dst: str | Path) -> Path:
    """diffusers directory -> orbax checkpoint, orbax checkpoint -> diffusers directory,
    PyTorch pickle -> safetensors file (through PyTorch's weights_only loader)."""
    src = Path(src)
    if src.suffix in PICKLE_SUFFIXES:
        return convert_pickle_to_safetensors(src, dst)
    if is_orbax_model(src):
        return save_diffusers_unet(*load_orbax_unet(src), dst)
    return save_orbax_unet(*load_diffusers_unet(src), dst)
