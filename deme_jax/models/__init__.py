"""Flax networks: diffusers-compatible UNet2D with DeMe's channel projections."""

from deme_jax.models.unet import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, UNet2D, init_params, param_shapes

__all__ = ["DOWN_BLOCK_TYPES", "UP_BLOCK_TYPES", "UNet2D", "init_params", "param_shapes"]
