"""Any diffusers or transformers model directory in and out, chosen by its config.json.

A diffusers directory names its class in ``_class_name``, a transformers one in
``architectures``; each class we read has a module here that translates its
config (``model_from_config`` / ``model_to_config``) and names its weights file.
"""

from __future__ import annotations

from pathlib import Path

from deme_jax.interop import autoencoder, clip, clip_text, unet, unet_condition
from deme_jax.interop.torch_layout import (
    PICKLE_SUFFIXES, load_pretrained, pickle_message, read_config, save_pretrained,
)

FORMATS = {fmt.CLASS_NAME: fmt for fmt in (unet, unet_condition, autoencoder, clip_text, clip)}
FORMAT_OF_MODULE = {fmt.MODEL_CLASS: fmt for fmt in FORMATS.values()}
# Classes a user may reasonably point us at, and what to do instead.
UNSUPPORTED = {
    "ControlNetModel": "ControlNet is not supported",
    "CLIPTextModelWithProjection": "SDXL's second text encoder is not supported",
}


def config_class(config: dict) -> str | None:
    return config.get("_class_name") or next(iter(config.get("architectures") or []), None)


def model_format(config: dict, config_file: Path):
    """The interop module that reads ``config``, or a ValueError naming the class and what is supported."""
    name = config_class(config)
    if name in FORMATS:
        return FORMATS[name]
    reason = UNSUPPORTED.get(name, f"{name!r} is not a model class deme_jax reads")
    raise ValueError(f"{config_file} describes a {name}: {reason}. Supported: {', '.join(sorted(FORMATS))}.")


def load_diffusers_model(path: str | Path, variant: str | None = None):
    """``(module, params)`` of a saved diffusers ``UNet2DModel``, ``UNet2DConditionModel`` or ``AutoencoderKL``
    directory, or a transformers ``CLIPTextModel`` or ``CLIPModel`` directory; ``variant`` "fp16" reads the
    half-precision weights (stored as float32 params)."""
    path = Path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise ValueError(pickle_message(path, path.with_suffix(".safetensors").name))
    config_file = path / "config.json"
    if not config_file.is_file():
        hint = (" It is a pipeline directory (model_index.json): load it with load_stable_diffusion, or pass "
                "one of its component directories." if (path / "model_index.json").is_file() else "")
        raise FileNotFoundError(f"No model at {path}: {config_file} is missing.{hint}")
    fmt = model_format(read_config(config_file), config_file)
    return load_pretrained(path, fmt.model_from_config, fmt.WEIGHTS_NAME, getattr(fmt, "IGNORED_WEIGHTS", ()), variant,
                           getattr(fmt, "KEY_PREFIX", ""))


def save_diffusers_model(module, params: dict, path: str | Path, variant: str | None = None) -> Path:
    """Writes what ``from_pretrained`` of the module's diffusers/transformers class loads (and
    :func:`load_diffusers_model` reads back bit for bit)."""
    fmt = FORMAT_OF_MODULE.get(type(module))
    if fmt is None:
        raise TypeError(f"{type(module).__name__} has no diffusers layout; saved are "
                        f"{', '.join(c.__name__ for c in FORMAT_OF_MODULE)}.")
    return save_pretrained(params, fmt.model_to_config(module), Path(path), fmt.WEIGHTS_NAME, variant)
