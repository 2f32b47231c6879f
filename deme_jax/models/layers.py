"""Layers that diffusers' UNets and autoencoder share, with diffusers' submodule names and numerics.

Tensors are NHWC. Attention goes through ``jax.nn.dot_product_attention``
(XLA's implementation), in query chunks on long sequences (see ``attention``).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from deme_jax.models.winograd import winograd_conv3x3, winograd_pays


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


def _channel_sums(x: jax.Array) -> jax.Array:
    """(B, ..., C) -> (B, C): sums over the positions first, a reduction XLA vectorises along the channels."""
    return x.reshape(x.shape[0], -1, x.shape[-1]).sum(1)


def _group_means(sums: jax.Array, groups: int, count: int, ndim: int) -> jax.Array:
    """Per-channel sums (B, C) -> each channel's group mean, shaped to broadcast against (B, ..., C)."""
    b, c = sums.shape
    means = sums.reshape(b, groups, c // groups).sum(-1, keepdims=True) / count
    return jnp.broadcast_to(means, (b, groups, c // groups)).reshape(b, *(1,) * (ndim - 2), c)


def _group_statistics(x: jax.Array, groups: int, eps: float) -> tuple[jax.Array, jax.Array]:
    # Two-pass variance, as PyTorch computes it: E[x^2] - E[x]^2 loses digits.
    count = x[0].size // groups
    mean = _group_means(_channel_sums(x), groups, count, x.ndim)
    centred = x - mean
    return mean, jax.lax.rsqrt(_group_means(_channel_sums(centred * centred), groups, count, x.ndim) + eps)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float) -> jax.Array:
    """Group normalisation of a channels-last (B, ..., C) tensor, statistics in at least float32.

    The same map as ``flax.linen.GroupNorm`` (two-pass variance) with a
    hand-written backward pass: the textbook GroupNorm gradient takes two
    per-channel reductions where autodiff of the statistics takes several, and
    keeps the input in its own dtype (bf16 stays bf16) between the passes.
    Measured on a 2-core CPU: the CIFAR-10 UNet's forward 1.13x, the demo
    model's forward and backward 1.07x faster than with ``nn.GroupNorm``.
    """
    return _group_normalize_forward(x, scale, bias, groups, eps)[0]


def _group_normalize_forward(x, scale, bias, groups, eps):
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean, rstd = _group_statistics(xf, groups, eps)
    return (xf - mean) * (rstd * scale) + bias, (x, mean, rstd, scale)


def _group_normalize_backward(groups, eps, residuals, dy):
    x, mean, rstd, scale = residuals
    count = x[0].size // groups
    normalized = (x.astype(dy.dtype) - mean) * rstd
    dbias, dscale = _channel_sums(dy), _channel_sums(dy * normalized)
    mean_dy = _group_means(dbias * scale, groups, count, x.ndim)
    mean_dy_normalized = _group_means(dscale * scale, groups, count, x.ndim)
    dx = (dy * scale - mean_dy - normalized * mean_dy_normalized) * rstd
    return dx.astype(x.dtype), dscale.sum(0), dbias.sum(0)


group_normalize.defvjp(_group_normalize_forward, _group_normalize_backward)


class GroupNorm(nn.Module):
    """``torch.nn.GroupNorm`` on channels-last tensors, parameters named as ``flax.linen.GroupNorm``'s."""

    groups: int
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        if channels % self.groups:
            raise ValueError(f"{channels} channels do not split into {self.groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        return group_normalize(x, scale, bias, self.groups, self.eps).astype(self.dtype)


def group_norm(groups: int, eps: float, name: str, dtype) -> GroupNorm:
    return GroupNorm(groups, eps, dtype, name=name)


NHWC = ("NHWC", "HWIO", "NHWC")


def _direct_conv(x, kernel, strides, pads, precision):
    return jax.lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=NHWC, precision=precision)


def _cpu_conv(x, kernel, strides, pads, precision):
    """Winograd's F(2x2, 3x3) where it beats XLA:CPU's direct convolution (``models.winograd``)."""
    if kernel.dtype == x.dtype and winograd_pays(x.shape, kernel.shape, strides, pads, x.dtype):
        return winograd_conv3x3(x, kernel, pads)
    return _direct_conv(x, kernel, strides, pads, precision)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, pads, precision):
    return jax.lax.platform_dependent(x, kernel, cpu=partial(_cpu_conv, strides=strides, pads=pads,
                                                             precision=precision),
                                      default=partial(_direct_conv, strides=strides, pads=pads, precision=precision))


def _conv_forward(x, kernel, strides, pads, precision):
    return _conv(x, kernel, strides, pads, precision), (x, kernel)


def _nhwc_gradients(strides, pads, precision, x, kernel, dy):
    """Both gradients as NHWC x HWIO -> NHWC convolutions, the one form XLA:CPU runs with its fast kernels
    wherever it sits: the input's from dy dilated by the stride against the flipped, transposed kernel; the
    kernel's with channels as the batch, images as the features and dy (stride-dilated) as the kernel."""
    size, out, window = x.shape[1:3], dy.shape[1:3], kernel.shape[:2]
    geometry = list(zip(window, pads, size, out, strides))
    input_pads = [(k - 1 - lo, n - 1 + lo - (m - 1) * s) for k, (lo, _), n, m, s in geometry]
    kernel_pads = [(lo, k - n - lo + (m - 1) * s) for k, (lo, _), n, m, s in geometry]
    flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
    if tuple(strides) == (1, 1):
        dx = _cpu_conv(dy, flipped, (1, 1), input_pads, precision)
    else:
        dx = jax.lax.conv_general_dilated(dy, flipped, (1, 1), input_pads, lhs_dilation=strides,
                                          dimension_numbers=NHWC, precision=precision)
    dk = jax.lax.conv_general_dilated(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), kernel_pads,
                                      rhs_dilation=strides, dimension_numbers=NHWC, precision=precision)
    return dx, dk.transpose(1, 2, 0, 3)


def _xla_gradients(strides, pads, precision, x, kernel, dy):
    conv = partial(jax.lax.conv_general_dilated, window_strides=strides, padding=pads, dimension_numbers=NHWC,
                   precision=precision)
    return jax.vjp(conv, x, kernel)[1](dy)


def _conv_backward(strides, pads, precision, residuals, dy):
    geometry = (strides, pads, precision)
    return jax.lax.platform_dependent(*residuals, dy, cpu=partial(_nhwc_gradients, *geometry),
                                      default=partial(_xla_gradients, *geometry))


_conv.defvjp(_conv_forward, _conv_backward)


def conv_nhwc(x, kernel, strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
              feature_group_count=1, precision=None):
    """``lax.conv_general_dilated`` for ``nn.Conv``'s NHWC layout, whose gradients XLA:CPU runs fast in loops too.

    XLA:CPU rewrites a convolution's gradients into its fast NHWC form only
    outside loops: inside a ``lax.scan``/``lax.map`` body (stacked replicas,
    gradient accumulation, chunked held-out losses) they ran as naive loops,
    60x slower (jaxlib 0.10.2; 10 3x3 convolutions, batch 32, 16x16x64: 7.2 s
    against 0.12 s). On CPUs the gradients are written in that form here
    (bit-identical to JAX's); other backends keep JAX's own, which cuDNN maps
    to its backward kernels. On CPUs, too, 3x3 stride-1 float32 convolutions
    and their input gradients run as Winograd's F(2x2, 3x3) where that is
    faster (``models.winograd``). ``dimension_numbers`` are ``nn.Conv``'s NHWC
    ones.
    """
    if {tuple(lhs_dilation or (1, 1)), tuple(rhs_dilation or (1, 1))} != {(1, 1)} or feature_group_count != 1:
        raise ValueError("conv_nhwc computes undilated, ungrouped convolutions only")
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
    return _conv(x, kernel, tuple(strides), tuple(map(tuple, padding)), precision)


def conv(features: int, kernel_size: int, name: str, dtype, strides: int = 1, padding=((1, 1), (1, 1))) -> nn.Conv:
    return nn.Conv(features, (kernel_size, kernel_size), strides, padding=padding, dtype=dtype, name=name,
                   conv_general_dilated=conv_nhwc)


def conv3x3(features: int, name: str, dtype) -> nn.Conv:
    return conv(features, 3, name, dtype)


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
    def __call__(self, x, temb=None, train: bool = False):
        """``temb`` None: no time embedding (the autoencoder's resnets have no ``time_emb_proj``)."""
        h = nn.silu(group_norm(self.groups, self.eps, "norm1", self.dtype)(x))
        h = conv3x3(self.out_channels, "conv1", self.dtype)(h)
        if temb is not None:
            h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, "norm2", self.dtype)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv3x3(self.out_channels, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = Conv1x1(self.out_channels, dtype=self.dtype, name="conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


# Above this many scores per (batch, head), attention goes in checkpointed query chunks of at most
# ATTENTION_CHUNK_SCORES scores each (256 queries x 4,096 keys).
ATTENTION_PLAIN_SCORES = 2**18
ATTENTION_CHUNK_SCORES = 2**20


def attention(q, k, v, heads: int) -> jax.Array:
    """Multi-head scaled dot-product attention over (B, L, heads * d) tensors, softmax in float32.

    XLA's ``dot_product_attention`` materialises the (L_q, L_k) probabilities of
    every head and keeps them for the backward pass: 2 GiB per layer for Stable
    Diffusion's 4,096 latent positions at batch 4, most of a training step's
    memory. Beyond ``ATTENTION_PLAIN_SCORES`` the queries therefore go in at least
    two chunks, one after another (``lax.map``), each rematerialised in the
    backward pass, so only q, k, v are kept and one chunk's probabilities exist at
    a time (PyTorch's fused SDPA saves memory the same way). The chunks are a loop
    rather than one checkpointed call because XLA:CPU drops the optimisation
    barrier of a loop-free ``jax.checkpoint`` and merges the recomputation back
    into the forward pass. Every query's softmax still spans every key, so the
    values are those of plain attention.
    """
    split = lambda y: y.reshape(*y.shape[:2], heads, y.shape[-1] // heads)
    q, k, v = split(q), split(k), split(v)
    length, keys = q.shape[1], k.shape[1]
    if length * keys <= ATTENTION_PLAIN_SCORES:
        out = jax.nn.dot_product_attention(q, k, v)
    else:
        chunk = min(-(-length // 2), max(1, ATTENTION_CHUNK_SCORES // keys))
        count = -(-length // chunk)
        padded = jnp.pad(q, ((0, 0), (0, count * chunk - length), (0, 0), (0, 0)))
        chunks = jnp.moveaxis(padded.reshape(q.shape[0], count, chunk, *q.shape[2:]), 1, 0)
        attend = jax.checkpoint(lambda query: jax.nn.dot_product_attention(query, k, v))
        out = jnp.moveaxis(jax.lax.map(attend, chunks), 0, 1).reshape(padded.shape)[:, :length]
    return out.reshape(*out.shape[:2], -1)


def multi_head_attention(x, context, heads: int, qkv_bias: bool, dtype) -> jax.Array:
    """diffusers' ``Attention``: ``to_q`` of ``x``, ``to_k``/``to_v`` of ``context``, attention, ``to_out.0``.

    Called inside a compact method, so the projections are submodules of the
    caller, named as in diffusers' state dicts.
    """
    c = x.shape[-1]
    q = nn.Dense(c, use_bias=qkv_bias, dtype=dtype, name="to_q")(x)
    k, v = (nn.Dense(c, use_bias=qkv_bias, dtype=dtype, name=n)(context) for n in ("to_k", "to_v"))
    return nn.Dense(c, dtype=dtype, name="to_out_0")(attention(q, k, v, heads))


class AttentionBlock(nn.Module):
    """Self-attention over spatial positions with a residual, diffusers' ``Attention`` with a group norm."""

    head_dim: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = group_norm(self.groups, self.eps, "group_norm", self.dtype)(x).reshape(b, hgt * wid, c)
        out = multi_head_attention(h, h, c // self.head_dim, True, self.dtype).reshape(b, hgt, wid, c)
        return (out + x) / self.output_scale_factor


class ChannelProjection(nn.Module):
    """DeMe's channel-wise projection: a bias-free 1x1 convolution initialised to the identity.

    Computed as ``x + x @ (W - I)``, the same map as ``x @ W``, so that the
    identity is exact on every backend: TF32 (GPU) or bfloat16 passes (TPU)
    round ``x`` in a product, and a student that does not start as its teacher
    would put a pretrained model's loss out of reach. The residual form also
    keeps bfloat16 compute from rounding ``W`` near the identity.
    """

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        kernel = self.param("kernel", lambda _, shape: jnp.eye(c).reshape(shape), (1, 1, c, c))
        delta = (kernel[0, 0] - jnp.eye(c, dtype=kernel.dtype)).astype(x.dtype)
        return x + jnp.einsum("bhwc,cd->bhwd", x, delta)


class Downsample2D(nn.Module):
    padding: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        # padding 0 is diffusers' (0, 1, 0, 1) right/bottom pad before a VALID conv.
        pad = ((1, 1), (1, 1)) if self.padding else ((0, 1), (0, 1))
        return conv(h.shape[-1], 3, "conv", self.dtype, strides=2, padding=pad)(h)


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
