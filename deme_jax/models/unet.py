"""UNet2D: the noise-prediction network of diffusers' ``UNet2DModel`` in Flax.

Fields and submodule names follow diffusers, so that a diffusers ``config.json``
builds the same network (``UNet2D(**fields)``) and a PyTorch state dict maps onto
the parameter tree key by key (``down_blocks.0.resnets.1.conv1.weight`` lives at
``params["down_blocks_0"]["resnets_1"]["conv1"]["kernel"]``). Tensors are NHWC.

Channel-wise projections (DeMe) sit after every down block's output, after the
mid block and after every up block: identity-initialised 1x1 convolutions without
bias, present only when ``channel_projection`` is on.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from deme_jax.models.layers import (
    AttentionBlock, ChannelProjection, Downsample2D, ResnetBlock2D, TimestepEmbedding, Upsample2D, conv3x3,
    group_norm, timestep_embedding,
)

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")


class DownBlock2D(nn.Module):
    """``DownBlock2D`` / ``AttnDownBlock2D``: returns the output and the skip tensors."""

    out_channels: int
    num_layers: int
    attention: bool
    head_dim: int
    groups: int
    eps: float
    dropout: float
    downsample: bool
    downsample_padding: int
    channel_projection: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, temb, train: bool = False):
        ch, g, eps, dt = self.out_channels, self.groups, self.eps, self.dtype
        skips = []
        for j in range(self.num_layers):
            h = ResnetBlock2D(ch, g, eps, self.dropout, dtype=dt, name=f"resnets_{j}")(h, temb, train)
            if self.attention:
                h = AttentionBlock(self.head_dim, g, eps, dtype=dt, name=f"attentions_{j}")(h)
            skips.append(h)
        if self.downsample:
            h = Downsample2D(self.downsample_padding, dt, name="downsamplers_0")(h)
            skips.append(h)
        if self.channel_projection:  # after the skips: they are collected unprojected
            h = ChannelProjection(name="channel_projection")(h)
        return h, skips


class MidBlock2D(nn.Module):
    """``UNetMidBlock2D``: resnet, optional attention, resnet."""

    groups: int
    attn_groups: int
    eps: float
    dropout: float
    attention: bool
    head_dim: int
    output_scale_factor: float
    channel_projection: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, temb, train: bool = False):
        ch, g, eps, s, dt = h.shape[-1], self.groups, self.eps, self.output_scale_factor, self.dtype
        h = ResnetBlock2D(ch, g, eps, self.dropout, s, dt, name="resnets_0")(h, temb, train)
        if self.attention:
            h = AttentionBlock(self.head_dim, self.attn_groups, eps, s, dt, name="attentions_0")(h)
        h = ResnetBlock2D(ch, g, eps, self.dropout, s, dt, name="resnets_1")(h, temb, train)
        if self.channel_projection:
            h = ChannelProjection(name="channel_projection")(h)
        return h


class UpBlock2D(nn.Module):
    """``UpBlock2D`` / ``AttnUpBlock2D``: concatenates ``[h, skip]`` before each resnet."""

    out_channels: int
    num_layers: int
    attention: bool
    head_dim: int
    groups: int
    eps: float
    dropout: float
    upsample: bool
    channel_projection: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, skips, temb, train: bool = False):
        ch, g, eps, dt = self.out_channels, self.groups, self.eps, self.dtype
        for j, skip in enumerate(skips):
            h = jnp.concatenate([h, skip], axis=-1)
            h = ResnetBlock2D(ch, g, eps, self.dropout, dtype=dt, name=f"resnets_{j}")(h, temb, train)
            if self.attention:
                h = AttentionBlock(self.head_dim, g, eps, dtype=dt, name=f"attentions_{j}")(h)
        if self.upsample:
            h = Upsample2D(dt, name="upsamplers_0")(h)
        if self.channel_projection:
            h = ChannelProjection(name="channel_projection")(h)
        return h


class UNet2D(nn.Module):
    """diffusers' ``UNet2DModel`` (positional timestep embedding, conv up/down sampling).

    ``attention_head_dim=None`` means one head spanning all channels of a block, as
    in diffusers. ``model.apply({"params": p}, x, t)`` returns the predicted noise
    for NHWC ``x`` and integer timesteps ``t`` of shape ``(batch,)`` (or a scalar).
    Defaults are diffusers' defaults.
    """

    sample_size: int | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    down_block_types: Sequence[str] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    up_block_types: Sequence[str] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: Sequence[int] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    dropout: float = 0.0
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    add_attention: bool = True
    time_embedding_dim: int | None = None
    channel_projection: bool = False
    dtype: jnp.dtype = jnp.float32

    def example_inputs(self) -> tuple:
        """The smallest inputs ``init`` accepts; parameter shapes do not depend on the image size."""
        size = 2 ** (len(self.block_out_channels) - 1)
        return jnp.zeros((1, size, size, self.in_channels), jnp.float32), jnp.zeros((1,), jnp.int32)

    def head_dim(self, channels: int) -> int:
        return channels if self.attention_head_dim is None else self.attention_head_dim

    @nn.compact
    def __call__(self, x, t, train: bool = False):
        chans, groups, eps, dt = self.block_out_channels, self.norm_num_groups, self.norm_eps, self.dtype
        common = dict(groups=groups, eps=eps, dropout=self.dropout, channel_projection=self.channel_projection, dtype=dt)
        if self.center_input_sample:
            x = 2 * x - 1.0
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        temb = timestep_embedding(t, chans[0], self.flip_sin_to_cos, self.freq_shift)
        temb = TimestepEmbedding(self.time_embedding_dim or 4 * chans[0], dt, name="time_embedding")(temb)

        h = conv3x3(chans[0], "conv_in", dt)(x.astype(dt))
        skips = [h]
        last = len(chans) - 1
        for i, (kind, ch) in enumerate(zip(self.down_block_types, chans)):
            block = DownBlock2D(
                ch, self.layers_per_block, kind == "AttnDownBlock2D", self.head_dim(ch),
                downsample=i < last, downsample_padding=self.downsample_padding, name=f"down_blocks_{i}", **common,
            )
            h, block_skips = block(h, temb, train)
            skips += block_skips

        h = MidBlock2D(
            attn_groups=self.attn_norm_num_groups or groups, attention=self.add_attention,
            head_dim=self.head_dim(chans[-1]), output_scale_factor=self.mid_block_scale_factor,
            name="mid_block", **common,
        )(h, temb, train)

        n = self.layers_per_block + 1
        for i, (kind, ch) in enumerate(zip(self.up_block_types, reversed(chans))):
            block_skips, skips = skips[-n:][::-1], skips[:-n]
            block = UpBlock2D(
                ch, n, kind == "AttnUpBlock2D", self.head_dim(ch), upsample=i < last, name=f"up_blocks_{i}", **common
            )
            h = block(h, block_skips, temb, train)

        h = nn.silu(group_norm(groups, eps, "conv_norm_out", dt)(h))
        return conv3x3(self.out_channels, "conv_out", dt)(h).astype(jnp.float32)
