"""Flax networks: diffusers' UNet2D and Stable Diffusion's conditional UNet, autoencoder and CLIP text encoder,
with DeMe's channel projections where DeMe finetunes, and transformers' CLIPModel for the CLIP score."""

from deme_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from deme_jax.models.clip import CLIPModel, CLIPVisionOutput, CLIPVisionTransformer
from deme_jax.models.clip_text import CLIPTextModel, CLIPTextOutput
from deme_jax.models.lora import LoRAModel, apply_lora, dense_delta, init_lora, lora_targets, merged_adapters
from deme_jax.models.registry import MODEL_CLASSES, build_model, init_params, model_fields, param_shapes
from deme_jax.models.unet import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, UNet2D
from deme_jax.models.unet_condition import UNet2DCondition

__all__ = ["DOWN_BLOCK_TYPES", "MODEL_CLASSES", "UP_BLOCK_TYPES", "AutoencoderKL", "CLIPModel", "CLIPTextModel",
           "CLIPTextOutput", "CLIPVisionOutput", "CLIPVisionTransformer", "DiagonalGaussian", "LoRAModel", "UNet2D",
           "UNet2DCondition", "apply_lora", "build_model", "dense_delta", "init_lora", "init_params", "lora_targets",
           "merged_adapters", "model_fields", "param_shapes"]
