"""AutoencoderKL: Stable Diffusion's VAE, diffusers' ``AutoencoderKL`` in Flax.

Fields are diffusers' config keys (defaults are diffusers' defaults) and
submodule names follow diffusers, so ``encoder.down_blocks.0.resnets.1.conv1.weight``
lives at ``params["encoder"]["down_blocks_0"]["resnets_1"]["conv1"]["kernel"]``.
Tensors are NHWC.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from deme_jax.models.layers import Conv1x1, Downsample2D, ResnetBlock2D, Upsample2D, conv3x3, group_norm
from deme_jax.models.unet import MidBlock2D

EPS = 1e-6  # every norm of diffusers' Encoder and Decoder
SUPPORTED = {
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "act_fn": ("silu", "swish"),
}


@struct.dataclass
class DiagonalGaussian:
    """The posterior over latents, diffusers' ``DiagonalGaussianDistribution`` (NHWC)."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """Splits channels into mean and log-variance, the latter clamped to [-30, 20] as diffusers does."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


class DownEncoderBlock2D(nn.Module):
    """Resnets without time embedding, then (except at the last level) a stride-2 convolution."""

    out_channels: int
    num_layers: int
    groups: int
    downsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        for j in range(self.num_layers):
            h = ResnetBlock2D(self.out_channels, self.groups, EPS, dtype=self.dtype, name=f"resnets_{j}")(h)
        if self.downsample:
            h = Downsample2D(0, self.dtype, name="downsamplers_0")(h)
        return h


class UpDecoderBlock2D(nn.Module):
    """Resnets without time embedding (no skip connections), then (except at the last level) a x2 upsampling."""

    out_channels: int
    num_layers: int
    groups: int
    upsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        for j in range(self.num_layers):
            h = ResnetBlock2D(self.out_channels, self.groups, EPS, dtype=self.dtype, name=f"resnets_{j}")(h)
        if self.upsample:
            h = Upsample2D(self.dtype, name="upsamplers_0")(h)
        return h


class CoderStack(nn.Module):
    """What diffusers' ``Encoder`` and ``Decoder`` share: the mid block and the norm-silu-conv output head."""

    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    norm_num_groups: int
    mid_block_add_attention: bool
    remat: bool
    dtype: jnp.dtype

    def block(self, cls: type[nn.Module]) -> type[nn.Module]:
        """``cls``, rematerialised in the backward pass when ``remat`` is on (same outputs, less memory)."""
        return nn.remat(cls) if self.remat else cls

    def mid_block(self, h):
        """diffusers' ``UNetMidBlock2D`` without time embedding: one head spanning all channels."""
        g = self.norm_num_groups
        return self.block(MidBlock2D)(
            groups=g, attn_groups=g, eps=EPS, dropout=0.0, attention=self.mid_block_add_attention,
            head_dim=h.shape[-1], output_scale_factor=1.0, channel_projection=False, dtype=self.dtype,
            name="mid_block",
        )(h, None)

    def head(self, h):
        h = nn.silu(group_norm(self.norm_num_groups, EPS, "conv_norm_out", self.dtype)(h))
        return conv3x3(self.out_channels, "conv_out", self.dtype)(h)


class Encoder(CoderStack):
    """diffusers' ``Encoder`` with ``double_z``: ``out_channels`` is twice the latent channels (mean, logvar)."""

    @nn.compact
    def __call__(self, x):
        chans, last = self.block_out_channels, len(self.block_out_channels) - 1
        h = conv3x3(chans[0], "conv_in", self.dtype)(x.astype(self.dtype))
        for i, ch in enumerate(chans):
            h = self.block(DownEncoderBlock2D)(ch, self.layers_per_block, self.norm_num_groups, i < last, self.dtype,
                                               name=f"down_blocks_{i}")(h)
        return self.head(self.mid_block(h))


class Decoder(CoderStack):
    """diffusers' ``Decoder`` (group norms): mid block, then up blocks of ``layers_per_block + 1`` resnets."""

    @nn.compact
    def __call__(self, z):
        chans, last = self.block_out_channels[::-1], len(self.block_out_channels) - 1
        h = self.mid_block(conv3x3(chans[0], "conv_in", self.dtype)(z.astype(self.dtype)))
        for i, ch in enumerate(chans):
            h = self.block(UpDecoderBlock2D)(ch, self.layers_per_block + 1, self.norm_num_groups, i < last,
                                             self.dtype, name=f"up_blocks_{i}")(h)
        return self.head(h)


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL`` (without tiling or slicing).

    ``encode`` maps NHWC images in [-1, 1] to the ``DiagonalGaussian`` of the
    latents; ``decode`` maps unscaled latents (divide by ``scaling_factor`` and
    add ``shift_factor`` first) to images. Both return float32 whatever the
    compute ``dtype``. ``sample_size``, ``scaling_factor``, ``shift_factor``,
    ``latents_mean``, ``latents_std`` and ``force_upcast`` are kept for the
    caller and config.json; the network does not read them.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
    up_block_types: Sequence[str] = ("UpDecoderBlock2D",)
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | Sequence[int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: Sequence[float] | None = None
    latents_std: Sequence[float] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    remat: bool = False
    dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        for key, allowed in SUPPORTED.items():
            value = getattr(self, key)
            values = value if isinstance(value, (tuple, list)) else (value,)
            if any(v not in allowed for v in values):
                raise ValueError(f"AutoencoderKL {key}={value!r} is not supported; supported: "
                                 f"{', '.join(map(repr, allowed))}.")
        n = len(self.block_out_channels)
        for key in ("down_block_types", "up_block_types"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"AutoencoderKL {key} has {len(getattr(self, key))} entries but block_out_channels "
                                 f"has {n}; give one block type per resolution level.")
        super().__post_init__()

    def example_inputs(self) -> tuple:
        """The smallest images ``init`` accepts (one latent pixel); parameter shapes do not depend on the size."""
        size = 2 ** (len(self.block_out_channels) - 1)
        return (jnp.zeros((1, size, size, self.in_channels), jnp.float32),)

    def setup(self):
        common = dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                      norm_num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                      remat=self.remat, dtype=self.dtype)
        self.encoder = Encoder(2 * self.latent_channels, **common)
        self.decoder = Decoder(self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = Conv1x1(2 * self.latent_channels, self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = Conv1x1(self.latent_channels, self.dtype)

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        moments = self.encoder(images)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, latents: jax.Array) -> jax.Array:
        z = latents.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array, sample_posterior: bool = False, rng: jax.Array | None = None):
        """diffusers' forward: decode the posterior's mode, or a sample of it drawn with ``rng``."""
        posterior = self.encode(images)
        return self.decode(posterior.sample(rng) if sample_posterior else posterior.mode())
