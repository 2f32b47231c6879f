"""CLIPTextModel: transformers' CLIP text encoder (Stable Diffusion's text encoder) in Flax.

Fields are transformers' ``CLIPTextConfig`` keys and submodule names follow its
state dict, so ``text_model.encoder.layers.0.self_attn.q_proj.weight`` lives at
``params["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]``.
Stable Diffusion conditions on ``last_hidden_state`` (SD 2.x's 23 layers are
OpenCLIP's 24 less the last, so that is its penultimate layer already);
diffusers' ``clip_skip=n`` takes ``hidden_states[-(n + 1)]`` through
``final_layer_norm`` instead.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP, SD 1.x
    "gelu": partial(jax.nn.gelu, approximate=False),  # OpenCLIP, SD 2.x
    "gelu_new": partial(jax.nn.gelu, approximate=True),
}


@struct.dataclass
class CLIPTextOutput:
    last_hidden_state: jax.Array  # (B, L, hidden), after final_layer_norm
    pooler_output: jax.Array  # (B, hidden): last_hidden_state at each sequence's end-of-text token
    hidden_states: tuple[jax.Array, ...]  # the embeddings, then each layer's output (the last one not normed)


def layer_norm(eps: float, name: str, dtype) -> nn.LayerNorm:
    # Two-pass variance, as PyTorch computes it.
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


class CLIPTextEmbeddings(nn.Module):
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        tokens = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(self.max_position_embeddings, self.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(input_ids.shape[-1]))
        return tokens + positions


class CLIPAttention(nn.Module):
    """Multi-head self-attention, causal in the text tower; ``mask`` (B, 1, 1, L) hides padded keys."""

    heads: int
    dtype: jnp.dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, h, mask):
        b, length, c = h.shape
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(h).reshape(b, length, self.heads, c // self.heads)
                   for n in ("q_proj", "k_proj", "v_proj"))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal).reshape(b, length, c)
        return nn.Dense(c, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        out = ACTIVATIONS[self.hidden_act](nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(h))
        return nn.Dense(h.shape[-1], dtype=self.dtype, name="fc2")(out)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block, shared by the text and the vision tower."""

    heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    dtype: jnp.dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, h, mask):
        h = h + CLIPAttention(self.heads, self.dtype, self.causal, name="self_attn")(
            layer_norm(self.eps, "layer_norm1", self.dtype)(h), mask)
        return h + CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(
            layer_norm(self.eps, "layer_norm2", self.dtype)(h))


class CLIPEncoder(nn.Module):
    """Returns every layer's output."""

    num_layers: int
    heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    dtype: jnp.dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, h, mask):
        outputs = []
        for i in range(self.num_layers):
            h = CLIPEncoderLayer(self.heads, self.intermediate_size, self.hidden_act, self.eps, self.dtype,
                                 self.causal, name=f"layers_{i}")(h, mask)
            outputs.append(h)
        return outputs


class CLIPTextModel(nn.Module):
    """transformers' ``CLIPTextModel`` (defaults are ``CLIPTextConfig``'s).

    ``model.apply({"params": p}, input_ids, attention_mask=None)`` with int ``input_ids``
    (B, L), L <= max_position_embeddings, returns a ``CLIPTextOutput`` in ``dtype``.
    ``attention_mask`` (B, L), 1 for tokens and 0 for padding, hides padded keys on top
    of the causal mask; Stable Diffusion passes none. ``projection_dim`` is kept only
    so that the config round-trips (the projection belongs to
    ``CLIPTextModelWithProjection``).
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    dtype: jnp.dtype = jnp.float32

    def example_inputs(self) -> tuple:
        return (jnp.zeros((1, 1), jnp.int32),)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None) -> CLIPTextOutput:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(CLIPTextModel)
                  if f.name not in ("parent", "name")}
        return CLIPTextTransformer(**fields, name="text_model")(input_ids, attention_mask)


class CLIPTextTransformer(CLIPTextModel):
    """The network itself, under the ``text_model`` scope as transformers nests it."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None) -> CLIPTextOutput:
        eps, dt = self.layer_norm_eps, self.dtype
        h = CLIPTextEmbeddings(self.vocab_size, self.max_position_embeddings, self.hidden_size, dt,
                               name="embeddings")(input_ids)
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        outputs = CLIPEncoder(self.num_hidden_layers, self.num_attention_heads, self.intermediate_size,
                              self.hidden_act, eps, dt, name="encoder")(h, mask)
        last = layer_norm(eps, "final_layer_norm", dt)(outputs[-1])
        if self.eos_token_id == 2:  # configs from before transformers#24773: the end token has the largest id
            eos = jnp.argmax(input_ids, axis=-1)
        else:  # the first end token (the pad token may be the same one)
            eos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=(h, *outputs))
