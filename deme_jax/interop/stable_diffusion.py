"""A diffusers Stable Diffusion directory (``model_index.json`` and one folder per component) in and out.

Components: ``unet/`` (UNet2DConditionModel), ``vae/`` (AutoencoderKL),
``text_encoder/`` (transformers CLIPTextModel), ``tokenizer/`` (CLIP BPE files)
and ``scheduler/`` (its config). The safety checker and feature extractor are
not loaded, and a saved directory has none (``requires_safety_checker`` false).
"""

from __future__ import annotations

import json
from pathlib import Path

from deme_jax.interop.diffusers import load_diffusers_model, save_diffusers_model
from deme_jax.interop.scheduler import load_diffusers_scheduler
from deme_jax.interop.torch_layout import read_config
from deme_jax.models import AutoencoderKL, CLIPTextModel, UNet2DCondition
from deme_jax.text2image.pipeline import StableDiffusion
from deme_jax.text2image.tokenizer import CLIPTokenizer

PIPELINE_CLASSES = ("StableDiffusionPipeline",)
MODELS = {"unet": UNet2DCondition, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
COMPONENTS = (*MODELS, "tokenizer", "scheduler")
# Components of other pipelines, and why a Stable Diffusion pipeline cannot stand in for them.
UNSUPPORTED_COMPONENTS = {
    "text_encoder_2": "SDXL (a second text encoder and added size/crop conditioning) is not supported",
    "controlnet": "ControlNet is not supported",
    "transformer": "diffusion-transformer pipelines (SD3, Flux, PixArt) are not supported",
}


def check_model_index(path: Path) -> dict:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"No Stable Diffusion pipeline at {path}: {index_file} is missing (save one with "
                                "StableDiffusionPipeline.save_pretrained).")
    index = read_config(index_file)
    for component, reason in UNSUPPORTED_COMPONENTS.items():
        if index.get(component):
            raise ValueError(f"{index_file} has a {component!r} component: {reason}.")
    if index.get("_class_name") not in PIPELINE_CLASSES:
        raise ValueError(f"{index_file} describes a {index.get('_class_name')}; deme_jax loads "
                         f"{', '.join(PIPELINE_CLASSES)} directories.")
    for component in COMPONENTS:
        if not (path / component).is_dir():
            raise FileNotFoundError(f"{path} lacks the {component}/ component of a Stable Diffusion pipeline "
                                    f"(needed: {', '.join(COMPONENTS)}).")
    return index


def load_stable_diffusion(path: str | Path, variant: str | None = None) -> StableDiffusion:
    """The pipeline of a diffusers Stable Diffusion directory; ``variant`` "fp16" reads the half-precision
    weights (into float32 parameters)."""
    path = Path(path)
    check_model_index(path)
    modules, params = {}, {}
    for name, cls in MODELS.items():
        modules[name], params[name] = load_diffusers_model(path / name, variant)
        if not isinstance(modules[name], cls):
            raise ValueError(f"{path / name} holds a {type(modules[name]).__name__}; a Stable Diffusion "
                             f"pipeline's {name} is a {cls.__name__}.")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    return StableDiffusion(
        tokenizer=CLIPTokenizer.from_directory(path / "tokenizer"), schedule=load_diffusers_scheduler(path),
        params=params, scheduler_config=read_config(scheduler_file) if scheduler_file.is_file() else {}, **modules)


def save_stable_diffusion(pipeline: StableDiffusion, path: str | Path, variant: str | None = None) -> Path:
    """Writes a directory that ``StableDiffusionPipeline.from_pretrained`` and :func:`load_stable_diffusion`
    load; the weights are bit-identical to the pipeline's parameters (``variant`` "fp16": half precision)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        save_diffusers_model(getattr(pipeline, name), pipeline.params[name], path / name, variant)
    pipeline.tokenizer.save(path / "tokenizer")
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(pipeline.scheduler_config, indent=2) + "\n")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", pipeline.scheduler_config.get("_class_name", "DDIMScheduler")],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path
