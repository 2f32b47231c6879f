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

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """Sinusoidal embedding of integer timesteps, as diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    # Frequencies in float32 in the same order of operations as diffusers, so the
    # embedding of t ~ 1000 does not drift by an ulp of the frequency.
    exponent = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32)
    freqs = np.exp(exponent / np.float32(half - freq_shift)).astype(np.float32)
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def group_norm(groups: int, eps: float, name: str, dtype) -> nn.GroupNorm:
    # Two-pass variance, as PyTorch computes it: E[x^2] - E[x]^2 loses digits.
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def conv3x3(features: int, name: str, dtype) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


class Conv1x1(nn.Module):
    """A 1x1 convolution (``nn.Conv``'s parameters) computed as a matmul over channels.

    Numerically the same map; written as an einsum because XLA's SPMD
    partitioner miscomputes a vmapped 1x1 ``conv`` whose replica axis is
    sharded (measured with jaxlib 0.10.2 on CPU), which stacked replicas are.
    """

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return jnp.einsum("bhwc,cd->bhwd", x.astype(self.dtype), kernel[0, 0].astype(self.dtype)) + bias.astype(
            self.dtype)


class ResnetBlock2D(nn.Module):
    out_channels: int
    groups: int
    eps: float
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, train: bool = False):
        h = nn.silu(group_norm(self.groups, self.eps, "norm1", self.dtype)(x))
        h = conv3x3(self.out_channels, "conv1", self.dtype)(h)
        h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, "norm2", self.dtype)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv3x3(self.out_channels, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = Conv1x1(self.out_channels, dtype=self.dtype, name="conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class AttentionBlock(nn.Module):
    """Self-attention over spatial positions with a residual, diffusers' ``Attention``."""

    head_dim: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        heads = c // self.head_dim
        h = group_norm(self.groups, self.eps, "group_norm", self.dtype)(x).reshape(b, hgt * wid, c)
        split = lambda y: y.reshape(b, hgt * wid, heads, self.head_dim)
        q, k, v = (split(nn.Dense(c, dtype=self.dtype, name=n)(h)) for n in ("to_q", "to_k", "to_v"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(self.head_dim)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, hgt * wid, c)
        out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(out).reshape(b, hgt, wid, c)
        return (out + x) / self.output_scale_factor


class ChannelProjection(nn.Module):
    """DeMe's channel-wise projection: a bias-free 1x1 convolution initialised to the identity."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        kernel = self.param("kernel", lambda _, shape: jnp.eye(c).reshape(shape), (1, 1, c, c))
        return jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0].astype(x.dtype))


class Downsample2D(nn.Module):
    padding: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        # padding 0 is diffusers' (0, 1, 0, 1) right/bottom pad before a VALID conv.
        pad = ((1, 1), (1, 1)) if self.padding else ((0, 1), (0, 1))
        return nn.Conv(h.shape[-1], (3, 3), strides=2, padding=pad, dtype=self.dtype, name="conv")(h)


class Upsample2D(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        return conv3x3(h.shape[-1], "conv", self.dtype)(h)


class TimestepEmbedding(nn.Module):
    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, emb):
        emb = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(emb.astype(self.dtype))
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(emb))


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


def init_params(model: UNet2D, rng: jax.Array) -> dict:
    """Fresh parameters; their shapes do not depend on the image size, so the smallest valid one is used."""
    size = 2 ** (len(model.block_out_channels) - 1)
    x = jnp.zeros((1, size, size, model.in_channels), jnp.float32)
    return model.init(rng, x, jnp.zeros((1,), jnp.int32))["params"]


def param_shapes(model: UNet2D) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, computed without allocating."""
    return jax.eval_shape(lambda rng: init_params(model, rng), jax.random.key(0))
