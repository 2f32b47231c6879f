"""One registry between a run's ``config.model`` block and the Flax module it describes.

``config.model`` holds ``class_name`` and the module's own fields, with the
compute dtype by name, so a run's config.json rebuilds its model exactly.
A new model family registers its class here; each defines ``example_inputs()``
(the smallest inputs its ``init`` takes), which ``init_params`` and
``param_shapes`` use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from deme_jax.models.autoencoder import AutoencoderKL
from deme_jax.models.clip import CLIPModel
from deme_jax.models.clip_text import CLIPTextModel
from deme_jax.models.unet import UNet2D
from deme_jax.models.unet_condition import UNet2DCondition

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (UNet2D, UNet2DCondition, AutoencoderKL, CLIPTextModel, CLIPModel)}


def model_class(class_name: str) -> type[nn.Module]:
    if class_name not in MODEL_CLASSES:
        raise ValueError(f"config.model.class_name={class_name!r}: use one of {sorted(MODEL_CLASSES)}.")
    return MODEL_CLASSES[class_name]


def field_names(cls: type[nn.Module]) -> list[str]:
    """The module's configurable fields (flax's own ``parent`` and ``name`` left out)."""
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def build_model(fields: Mapping) -> nn.Module:
    """The module a ``config.model`` block describes (a block without ``class_name`` is a UNet2D)."""
    fields = dict(fields)
    cls = model_class(fields.pop("class_name", "UNet2D"))
    fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in fields.items()}
    fields["dtype"] = jnp.dtype(fields.get("dtype", "float32"))
    return cls(**fields)


def model_fields(model: nn.Module) -> dict:
    """The ``config.model`` block of ``model``: JSON-able, and ``build_model`` of it equals ``model``."""
    fields = {"class_name": next(k for k, v in MODEL_CLASSES.items() if v is type(model))}
    for name in field_names(type(model)):
        value = getattr(model, name)
        fields[name] = jnp.dtype(value).name if name == "dtype" else value
    return fields


def init_params(model: nn.Module, rng: jax.Array) -> dict:
    """Fresh parameters of any registered model, from its ``example_inputs()``: one compiled program (running the
    initialising forward pass op by op compiles each op apart, tens of seconds for a UNet)."""
    return jax.jit(lambda rng: model.init(rng, *model.example_inputs())["params"])(rng)


def param_shapes(model: nn.Module) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, computed without allocating."""
    return jax.eval_shape(lambda rng: init_params(model, rng), jax.random.key(0))
