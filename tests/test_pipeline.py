"""A whole sampling run through the real UNet against diffusers' pipelines.

The pipeline directory diffusers writes is read back with our loaders (UNet and
scheduler), the same initial noise goes into both, and the final images must
agree to 1e-4 relative L2: float32 differences of ~1e-6 per network call, grown
by the 1/sqrt(alpha-bar) factors of ten DDIM steps, stay well below it.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMScheduler

from deme_jax.diffusion import ddim_sample
from deme_jax.interop import load_diffusers_scheduler, load_diffusers_unet
from tests.diffusers_util import CIFAR_LAYOUT, random_unet

pytestmark = pytest.mark.reference


def test_ddim_run_matches_ddim_pipeline(tmp_path):
    unet = random_unet(**dict(CIFAR_LAYOUT, sample_size=16, block_out_channels=(32, 64, 64, 64),
                              attention_head_dim=None, norm_num_groups=8))
    # google/ddpm-cifar10-32's scheduler: linear betas, clipping, fixed_large variance.
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                              variance_type="fixed_large")
    pipeline = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.save_pretrained(tmp_path)

    expected = pipeline(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10,
                        output_type="np").images
    noise = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(0)).permute(0, 2, 3, 1).numpy()

    model, params = load_diffusers_unet(tmp_path)
    schedule = load_diffusers_scheduler(tmp_path)
    images = ddim_sample(model, params, schedule, jnp.asarray(noise), num_inference_steps=10)
    ours = np.clip(np.asarray(images) / 2 + 0.5, 0, 1)
    assert np.linalg.norm(ours - expected) / np.linalg.norm(expected) <= 1e-4
