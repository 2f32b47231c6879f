"""A tiny Stable Diffusion pipeline with random weights, built by diffusers and transformers and saved offline.

The layout is Stable Diffusion's (cross-attention down/up blocks, a KL
autoencoder, a CLIP text encoder with the real CLIP vocabulary, SD's
scheduler config); only the widths are small.
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tests.clip_vocab import write_clip_tokenizer

# The scheduler_config.json of Stable Diffusion 1.x (a PNDM config; samplers take its schedule).
SD1_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                 "set_alpha_to_one": False, "steps_offset": 1, "num_train_timesteps": 1000}


def perturb(model, seed: int, scale: float = 0.02):
    """Adds noise to every parameter (norm scales and biases included), so no mapping error hides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model.eval()


def tiny_pipeline(path: Path, prediction_type: str = "epsilon", seed: int = 0) -> tuple[StableDiffusionPipeline, Path]:
    """A tiny random StableDiffusionPipeline saved under ``path``: the pipeline as diffusers loads it back, and
    its directory. (The reloaded one is the reference: an unsaved scheduler's config lacks the defaults that
    saving writes, such as DDIM's "leading" spacing, which another scheduler's ``from_config`` then misses.)"""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1))
    write_clip_tokenizer(path / "vocab")
    pipe = StableDiffusionPipeline(
        vae=perturb(vae, seed + 1), text_encoder=perturb(text_encoder, seed + 2), unet=perturb(unet, seed + 3),
        tokenizer=CLIPTokenizer.from_pretrained(path / "vocab"),
        scheduler=DDIMScheduler(**SD1_SCHEDULER, prediction_type=prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path / "pipeline")
    return StableDiffusionPipeline.from_pretrained(path / "pipeline", safety_checker=None), path / "pipeline"
