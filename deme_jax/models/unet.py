"""UNet2D: the noise-prediction network of diffusers' ``UNet2DModel`` in Flax, and the
blocks and skeleton (``UNet``) that the text-conditioned ``UNet2DCondition`` shares.

Fields and submodule names follow diffusers, so that a diffusers ``config.json``
builds the same network (``UNet2D(**fields)``) and a PyTorch state dict maps onto
the parameter tree key by key (``down_blocks.0.resnets.1.conv1.weight`` lives at
``params["down_blocks_0"]["resnets_1"]["conv1"]["kernel"]``). Tensors are NHWC.

Channel-wise projections (DeMe) sit after every down block's output, after the
mid block and after every up block: identity-initialised 1x1 convolutions without
bias, present only when ``channel_projection`` is on.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from deme_jax.models.layers import (
    AttentionBlock, ChannelProjection, Downsample2D, ResnetBlock2D, TimestepEmbedding, Upsample2D, conv3x3,
    group_norm, timestep_embedding,
)

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")
PLAIN_BLOCK_TYPES = ("DownBlock2D", "UpBlock2D")  # without attention, in every UNet


class DownBlock2D(nn.Module):
    """``DownBlock2D``: resnets, each followed by ``attend``, then a downsampler; returns the output and the skips.

    Plain resnets here; subclasses attend after each resnet (``AttnDownBlock2D``,
    ``CrossAttnDownBlock2D``). ``context`` is what a subclass attends to.
    """

    out_channels: int
    num_layers: int
    groups: int
    eps: float
    dropout: float
    downsample: bool
    downsample_padding: int
    channel_projection: bool
    dtype: jnp.dtype = jnp.float32

    def attend(self, h, j: int, context):
        return h

    @nn.compact
    def __call__(self, h, temb, context=None, train: bool = False):
        ch, g, eps, dt = self.out_channels, self.groups, self.eps, self.dtype
        skips = []
        for j in range(self.num_layers):
            h = ResnetBlock2D(ch, g, eps, self.dropout, dtype=dt, name=f"resnets_{j}")(h, temb, train)
            h = self.attend(h, j, context)
            skips.append(h)
        if self.downsample:
            h = Downsample2D(self.downsample_padding, dt, name="downsamplers_0")(h)
            skips.append(h)
        if self.channel_projection:  # after the skips: they are collected unprojected
            h = ChannelProjection(name="channel_projection")(h)
        return h, skips


class AttnDownBlock2D(DownBlock2D, kw_only=True):
    """``AttnDownBlock2D``: self-attention after each resnet."""

    head_dim: int

    def attend(self, h, j: int, context):
        return AttentionBlock(self.head_dim, self.groups, self.eps, dtype=self.dtype, name=f"attentions_{j}")(h)


class MidBlock(nn.Module):
    """What diffusers' mid blocks share: resnet, ``attend``, resnet."""

    groups: int
    eps: float
    dropout: float
    output_scale_factor: float
    channel_projection: bool
    dtype: jnp.dtype = jnp.float32

    def attend(self, h, j: int, context):
        raise NotImplementedError

    @nn.compact
    def __call__(self, h, temb, context=None, train: bool = False):
        ch, g, eps, s, dt = h.shape[-1], self.groups, self.eps, self.output_scale_factor, self.dtype
        h = ResnetBlock2D(ch, g, eps, self.dropout, s, dt, name="resnets_0")(h, temb, train)
        h = self.attend(h, 0, context)
        h = ResnetBlock2D(ch, g, eps, self.dropout, s, dt, name="resnets_1")(h, temb, train)
        if self.channel_projection:
            h = ChannelProjection(name="channel_projection")(h)
        return h


class MidBlock2D(MidBlock, kw_only=True):
    """``UNetMidBlock2D``: resnet, optional self-attention, resnet."""

    attn_groups: int
    attention: bool
    head_dim: int

    def attend(self, h, j: int, context):
        if not self.attention:
            return h
        return AttentionBlock(self.head_dim, self.attn_groups, self.eps, self.output_scale_factor, self.dtype,
                              name=f"attentions_{j}")(h)


class UpBlock2D(nn.Module):
    """``UpBlock2D``: concatenates ``[h, skip]`` before each resnet, each followed by ``attend``, then upsamples."""

    out_channels: int
    num_layers: int
    groups: int
    eps: float
    dropout: float
    upsample: bool
    channel_projection: bool
    dtype: jnp.dtype = jnp.float32

    def attend(self, h, j: int, context):
        return h

    @nn.compact
    def __call__(self, h, skips, temb, context=None, train: bool = False):
        ch, g, eps, dt = self.out_channels, self.groups, self.eps, self.dtype
        for j, skip in enumerate(skips):
            h = jnp.concatenate([h, skip], axis=-1)
            h = ResnetBlock2D(ch, g, eps, self.dropout, dtype=dt, name=f"resnets_{j}")(h, temb, train)
            h = self.attend(h, j, context)
        if self.upsample:
            h = Upsample2D(dt, name="upsamplers_0")(h)
        if self.channel_projection:
            h = ChannelProjection(name="channel_projection")(h)
        return h


class AttnUpBlock2D(UpBlock2D, kw_only=True):
    """``AttnUpBlock2D``: self-attention after each resnet."""

    head_dim: int

    def attend(self, h, j: int, context):
        return AttentionBlock(self.head_dim, self.groups, self.eps, dtype=self.dtype, name=f"attentions_{j}")(h)


BLOCK_CLASSES = {"DownBlock2D": DownBlock2D, "AttnDownBlock2D": AttnDownBlock2D, "UNetMidBlock2D": MidBlock2D,
                 "UpBlock2D": UpBlock2D, "AttnUpBlock2D": AttnUpBlock2D}


class UNet(nn.Module):
    """What diffusers' UNets share: time embedding, ``conv_in``, down blocks collecting skips, mid block, up blocks
    consuming them, norm-silu-``conv_out``. Subclasses declare the fields read here and map block types to classes."""

    def block_class(self, kind: str) -> type[nn.Module]:
        """The class of diffusers block type ``kind``."""
        raise NotImplementedError

    def attention_fields(self, level: int) -> dict:
        """The settings of an attention block at resolution ``level``."""
        raise NotImplementedError

    def mid_block(self) -> nn.Module:
        raise NotImplementedError

    def block(self, kind: str, level: int, **fields) -> nn.Module:
        """A block of type ``kind``; rematerialised when ``remat`` is on, with ``train`` (every block's last
        argument) static."""
        if kind not in PLAIN_BLOCK_TYPES:
            fields.update(self.attention_fields(level))
        cls = self.block_class(kind)
        if self.remat:
            cls = nn.remat(cls, static_argnums=(len(inspect.signature(cls.__call__).parameters) - 1,))
        return cls(groups=self.norm_num_groups, eps=self.norm_eps, dropout=self.dropout,
                   channel_projection=self.channel_projection, dtype=self.dtype, **fields)

    def down_block(self, i: int) -> nn.Module:
        return self.block(self.down_block_types[i], i, out_channels=self.block_out_channels[i],
                          num_layers=self.layers_per_block, downsample=i < len(self.block_out_channels) - 1,
                          downsample_padding=self.downsample_padding, name=f"down_blocks_{i}")

    def up_block(self, i: int) -> nn.Module:
        level = len(self.block_out_channels) - 1 - i
        return self.block(self.up_block_types[i], level, out_channels=self.block_out_channels[level],
                          num_layers=self.layers_per_block + 1, upsample=level > 0, name=f"up_blocks_{i}")

    def unet(self, x, t, context, train: bool):
        """The prediction for NHWC ``x``, timesteps ``t`` (shape ``(batch,)`` or scalar) and ``context``."""
        chans, dt = self.block_out_channels, self.dtype
        if self.center_input_sample:
            x = 2 * x - 1.0
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        temb = timestep_embedding(t, chans[0], self.flip_sin_to_cos, self.freq_shift)
        temb = TimestepEmbedding(self.time_embedding_dim or 4 * chans[0], dt, name="time_embedding")(temb)

        h = conv3x3(chans[0], "conv_in", dt)(x.astype(dt))
        skips = [h]
        for i in range(len(chans)):
            h, block_skips = self.down_block(i)(h, temb, context, train)
            skips += block_skips

        h = self.mid_block()(h, temb, context, train)

        n = self.layers_per_block + 1
        for i in range(len(chans)):
            block_skips, skips = skips[-n:][::-1], skips[:-n]
            h = self.up_block(i)(h, block_skips, temb, context, train)

        h = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, "conv_norm_out", dt)(h))
        return conv3x3(self.out_channels, "conv_out", dt)(h).astype(jnp.float32)


class UNet2D(UNet):
    """diffusers' ``UNet2DModel`` (positional timestep embedding, conv up/down sampling).

    ``attention_head_dim=None`` means one head spanning all channels of a block, as
    in diffusers. ``model.apply({"params": p}, x, t)`` returns the predicted noise
    for NHWC ``x`` and integer timesteps ``t`` of shape ``(batch,)`` (or a scalar).
    ``remat`` recomputes each block's activations in the backward pass (same
    values, less memory). Defaults are diffusers' defaults.
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
    remat: bool = False
    dtype: jnp.dtype = jnp.float32

    def example_inputs(self) -> tuple:
        """The smallest inputs ``init`` accepts; parameter shapes do not depend on the image size."""
        size = 2 ** (len(self.block_out_channels) - 1)
        return jnp.zeros((1, size, size, self.in_channels), jnp.float32), jnp.zeros((1,), jnp.int32)

    def head_dim(self, channels: int) -> int:
        return channels if self.attention_head_dim is None else self.attention_head_dim

    def block_class(self, kind: str) -> type[nn.Module]:
        return BLOCK_CLASSES[kind]

    def attention_fields(self, level: int) -> dict:
        return dict(head_dim=self.head_dim(self.block_out_channels[level]))

    def mid_block(self) -> nn.Module:
        return self.block("UNetMidBlock2D", -1, attn_groups=self.attn_norm_num_groups or self.norm_num_groups,
                          attention=self.add_attention, output_scale_factor=self.mid_block_scale_factor,
                          name="mid_block")

    @nn.compact
    def __call__(self, x, t, train: bool = False):
        return self.unet(x, t, None, train)

