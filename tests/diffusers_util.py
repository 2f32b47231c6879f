"""Small diffusers models with every parameter randomised, saved offline."""

import torch
from diffusers import UNet2DModel

from deme_jax.interop.unet import DDPM_CIFAR10_CONFIG

CIFAR_LAYOUT = {k: v for k, v in DDPM_CIFAR10_CONFIG.items()
                if k not in ("sample_size", "block_out_channels", "attention_head_dim")}
LSUN_LAYOUT = dict(
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    layers_per_block=2, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
)
LSUN_CONFIG = dict(LSUN_LAYOUT, sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                   attention_head_dim=None)


def random_unet(seed: int = 0, **config) -> UNet2DModel:
    """A diffusers UNet2DModel whose norm scales and biases are random too, so no mapping error hides."""
    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def torch_forward(model: UNet2DModel, x_nhwc, t):
    with torch.no_grad():
        out = model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2), torch.from_numpy(t)).sample
    return out.permute(0, 2, 3, 1).numpy()
