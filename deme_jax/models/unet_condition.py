"""UNet2DCondition: Stable Diffusion's text-conditioned UNet, diffusers' ``UNet2DConditionModel`` in Flax.

Fields are diffusers' config keys and submodule names follow diffusers, so
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`` lives at
``params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]``.
Tensors are NHWC. The plain down, mid and up blocks are UNet2D's; here the
cross-attention variants attend to the text states through a ``Transformer2DModel``
after each resnet. DeMe's channel projections sit where UNet2D puts them.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from deme_jax.models.layers import Conv1x1, group_norm, multi_head_attention
from deme_jax.models.unet import DownBlock2D, MidBlock, UNet, UpBlock2D

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
TRANSFORMER_GROUP_NORM_EPS = 1e-6  # fixed in diffusers' Transformer2DModel, whatever the UNet's norm_eps
LAYER_NORM_EPS = 1e-5


class Attention(nn.Module):
    """A transformer block's ``Attention``: bias-free q/k/v projections, ``to_out.0`` with a bias."""

    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        return multi_head_attention(x, context, self.heads, False, self.dtype)


class GEGLU(nn.Module):
    """``proj`` to twice the width, then value * gelu(gate) (exact gelu, PyTorch's default)."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        value, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU to four times the width (``net.0``), then back (``net.2``)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = GEGLU(4 * x.shape[-1], self.dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to ``context`` and feed-forward, each with a residual."""

    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, context):
        dt = self.dtype
        norm = lambda name: nn.LayerNorm(LAYER_NORM_EPS, dtype=dt, use_fast_variance=False, name=name)
        x = norm("norm1")(h)
        h = h + Attention(self.heads, dt, name="attn1")(x, x)
        h = h + Attention(self.heads, dt, name="attn2")(norm("norm2")(h), context)
        return h + FeedForward(dt, name="ff")(norm("norm3")(h))


class Transformer2DModel(nn.Module):
    """Group norm, ``proj_in``, transformer blocks over the flattened positions, ``proj_out``, residual.

    The projections are 1x1 convolutions (SD 1.x) or linear layers (SD 2.x,
    ``use_linear_projection``): the same map with differently shaped weights.
    """

    heads: int
    num_layers: int
    groups: int
    use_linear_projection: bool
    dtype: jnp.dtype = jnp.float32

    def project(self, features: int, name: str) -> nn.Module:
        if self.use_linear_projection:
            return nn.Dense(features, dtype=self.dtype, name=name)
        return Conv1x1(features, self.dtype, name=name)

    @nn.compact
    def __call__(self, x, context):
        b, hgt, wid, c = x.shape
        inner = self.heads * (c // self.heads)
        h = group_norm(self.groups, TRANSFORMER_GROUP_NORM_EPS, "norm", self.dtype)(x)
        h = self.project(inner, "proj_in")(h).reshape(b, hgt * wid, inner)
        for j in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.dtype, name=f"transformer_blocks_{j}")(h, context)
        return self.project(c, "proj_out")(h.reshape(b, hgt, wid, inner)) + x


class CrossAttention(nn.Module, kw_only=True):
    """Makes a block attend to the text states: a ``Transformer2DModel`` after each resnet."""

    heads: int
    transformer_layers: int
    use_linear_projection: bool

    def attend(self, h, j: int, context):
        return Transformer2DModel(self.heads, self.transformer_layers, self.groups, self.use_linear_projection,
                                  self.dtype, name=f"attentions_{j}")(h, context)


class CrossAttnDownBlock2D(CrossAttention, DownBlock2D):
    """``CrossAttnDownBlock2D``."""


class UNetMidBlock2DCrossAttn(CrossAttention, MidBlock):
    """``UNetMidBlock2DCrossAttn``."""


class CrossAttnUpBlock2D(CrossAttention, UpBlock2D):
    """``CrossAttnUpBlock2D``."""


BLOCK_CLASSES = {"DownBlock2D": DownBlock2D, "CrossAttnDownBlock2D": CrossAttnDownBlock2D,
                 "UNetMidBlock2DCrossAttn": UNetMidBlock2DCrossAttn, "UpBlock2D": UpBlock2D,
                 "CrossAttnUpBlock2D": CrossAttnUpBlock2D}


class UNet2DCondition(UNet):
    """diffusers' ``UNet2DConditionModel`` in Stable Diffusion 1.x and 2.x layouts.

    ``model.apply({"params": p}, sample, timesteps, encoder_hidden_states)``
    returns the float32 prediction for NHWC ``sample``, timesteps of shape
    ``(batch,)`` (or a scalar) and text states ``(batch, tokens, cross_attention_dim)``.
    As in diffusers, ``attention_head_dim`` is the number of heads per block unless
    ``num_attention_heads`` is given. Softmax is always float32, so
    ``upcast_attention`` and ``sample_size`` are only carried for config.json.
    ``remat`` recomputes each block's activations in the backward pass (same
    values, less memory). Defaults are diffusers' defaults.
    """

    sample_size: int | Sequence[int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Sequence[str] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | Sequence[int] = 1
    attention_head_dim: int | Sequence[int] = 8
    num_attention_heads: int | Sequence[int] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: int | None = None
    channel_projection: bool = False
    remat: bool = False
    dtype: jnp.dtype = jnp.float32

    def example_inputs(self) -> tuple:
        """The smallest inputs ``init`` accepts; parameter shapes depend on neither image size nor token count."""
        size = 2 ** (len(self.block_out_channels) - 1)
        return (jnp.zeros((1, size, size, self.in_channels), jnp.float32), jnp.zeros((1,), jnp.int32),
                jnp.zeros((1, 1, self.cross_attention_dim), jnp.float32))

    def per_block(self, value) -> tuple:
        """diffusers takes one value for every block or one per block."""
        return tuple(value) if isinstance(value, Sequence) else (value,) * len(self.block_out_channels)

    def block_class(self, kind: str) -> type[nn.Module]:
        return BLOCK_CLASSES[kind]

    def attention_fields(self, level: int) -> dict:
        return dict(heads=self.per_block(self.num_attention_heads or self.attention_head_dim)[level],
                    transformer_layers=self.per_block(self.transformer_layers_per_block)[level],
                    use_linear_projection=self.use_linear_projection)

    def mid_block(self) -> nn.Module:
        return self.block("UNetMidBlock2DCrossAttn", -1, output_scale_factor=self.mid_block_scale_factor,
                          name="mid_block")

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, train: bool = False):
        return self.unet(sample, timesteps, encoder_hidden_states.astype(self.dtype), train)
