"""Flax networks: diffusers-compatible UNet2D with DeMe's channel projections."""

from deme_jax.models.registry import MODEL_CLASSES, build_model, init_params, model_fields, param_shapes
from deme_jax.models.unet import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, UNet2D

__all__ = ["DOWN_BLOCK_TYPES", "MODEL_CLASSES", "UP_BLOCK_TYPES", "UNet2D", "build_model", "init_params",
           "model_fields", "param_shapes"]
