"""CLIPModel: transformers' CLIP (image and text towers with their projections) in Flax, for the CLIP score.

Submodule names follow transformers' state dict, so
``vision_model.encoder.layers.0.mlp.fc1.weight`` lives at
``params["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]``. The
vision tower is the text tower's pre-LN encoder without the causal mask, over a
class token and the patch embeddings; it takes NHWC pixel values, preprocessed
as ``deme_jax.metrics.clip_score.preprocess`` does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from deme_jax.models.clip_text import CLIPEncoder, CLIPTextModel, CLIPTextTransformer, layer_norm


@struct.dataclass
class CLIPVisionOutput:
    last_hidden_state: jax.Array  # (B, 1 + patches, hidden), not normed
    pooler_output: jax.Array  # (B, hidden): the class token through post_layernorm


class CLIPVisionEmbeddings(nn.Module):
    hidden_size: int
    patch_size: int
    num_positions: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        p = self.patch_size
        patches = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                          name="patch_embedding")(pixel_values)
        patches = patches.reshape(patches.shape[0], -1, self.hidden_size)  # row-major, as torch's flatten(2)
        class_embedding = self.param("class_embedding", nn.initializers.normal(1.0), (self.hidden_size,))
        class_token = jnp.broadcast_to(class_embedding.astype(patches.dtype), (patches.shape[0], 1, self.hidden_size))
        h = jnp.concatenate([class_token, patches], axis=1)
        return h + nn.Embed(self.num_positions, self.hidden_size, dtype=self.dtype,
                            name="position_embedding")(jnp.arange(self.num_positions))


class CLIPVisionTransformer(nn.Module):
    """transformers' ``CLIPVisionModel`` network (defaults are ``CLIPVisionConfig``'s).

    Takes pixel values (B, image_size, image_size, num_channels) and returns a ``CLIPVisionOutput``.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values) -> CLIPVisionOutput:
        expected = (self.image_size, self.image_size, self.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"CLIP's vision tower takes preprocessed pixel values of shape (batch, "
                             f"{', '.join(map(str, expected))}) (NHWC), got {tuple(pixel_values.shape)}.")
        eps, dt = self.layer_norm_eps, self.dtype
        h = CLIPVisionEmbeddings(self.hidden_size, self.patch_size, (self.image_size // self.patch_size) ** 2 + 1, dt,
                                 name="embeddings")(pixel_values)
        h = layer_norm(eps, "pre_layrnorm", dt)(h)  # sic, transformers' name
        last = CLIPEncoder(self.num_hidden_layers, self.num_attention_heads, self.intermediate_size, self.hidden_act,
                           eps, dt, causal=False, name="encoder")(h, None)[-1]
        return CLIPVisionOutput(last_hidden_state=last, pooler_output=layer_norm(eps, "post_layernorm", dt)(last[:, 0]))


def l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nn.Module):
    """transformers' ``CLIPModel`` (defaults are ``CLIPConfig``'s).

    The towers' settings are fields named ``text_<key>`` and ``vision_<key>`` after the keys of
    ``CLIPTextConfig`` and ``CLIPVisionConfig`` (``TEXT_KEYS``, ``VISION_KEYS``), so that the module stays
    flat, hashable and JSON-able as the registry needs. ``get_image_features`` and ``get_text_features``
    give the projected embeddings (``apply(..., method=...)``); calling the module gives transformers'
    ``logits_per_image``: exp(logit_scale) times the cosine of every (image, text) pair.
    """

    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    text_vocab_size: int = CLIPTextModel.vocab_size
    text_hidden_size: int = CLIPTextModel.hidden_size
    text_intermediate_size: int = CLIPTextModel.intermediate_size
    text_num_hidden_layers: int = CLIPTextModel.num_hidden_layers
    text_num_attention_heads: int = CLIPTextModel.num_attention_heads
    text_max_position_embeddings: int = CLIPTextModel.max_position_embeddings
    text_hidden_act: str = CLIPTextModel.hidden_act
    text_layer_norm_eps: float = CLIPTextModel.layer_norm_eps
    text_pad_token_id: int = CLIPTextModel.pad_token_id
    text_bos_token_id: int = CLIPTextModel.bos_token_id
    text_eos_token_id: int = CLIPTextModel.eos_token_id
    vision_hidden_size: int = CLIPVisionTransformer.hidden_size
    vision_intermediate_size: int = CLIPVisionTransformer.intermediate_size
    vision_num_hidden_layers: int = CLIPVisionTransformer.num_hidden_layers
    vision_num_attention_heads: int = CLIPVisionTransformer.num_attention_heads
    vision_num_channels: int = CLIPVisionTransformer.num_channels
    vision_image_size: int = CLIPVisionTransformer.image_size
    vision_patch_size: int = CLIPVisionTransformer.patch_size
    vision_hidden_act: str = CLIPVisionTransformer.hidden_act
    vision_layer_norm_eps: float = CLIPVisionTransformer.layer_norm_eps
    dtype: jnp.dtype = jnp.float32

    def example_inputs(self) -> tuple:
        size, channels = self.vision_image_size, self.vision_num_channels
        return jnp.zeros((1, size, size, channels)), jnp.zeros((1, 1), jnp.int32)

    def setup(self):
        self.text_model = CLIPTextTransformer(**{k: getattr(self, "text_" + k) for k in TEXT_KEYS}, dtype=self.dtype)
        self.vision_model = CLIPVisionTransformer(**{k: getattr(self, "vision_" + k) for k in VISION_KEYS},
                                                  dtype=self.dtype)
        self.visual_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)
        self.text_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init_value), ())

    def get_image_features(self, pixel_values) -> jax.Array:
        """(B, projection_dim): the pooled class token, projected."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def get_text_features(self, input_ids, attention_mask=None) -> jax.Array:
        """(B, projection_dim): the end-of-text token's state, projected."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

    def __call__(self, pixel_values, input_ids, attention_mask=None) -> jax.Array:
        image = l2_normalize(self.get_image_features(pixel_values))
        text = l2_normalize(self.get_text_features(input_ids, attention_mask))
        return jnp.exp(self.logit_scale) * image @ text.T


def tower_keys(prefix: str) -> tuple[str, ...]:
    return tuple(f.name.removeprefix(prefix) for f in dataclasses.fields(CLIPModel) if f.name.startswith(prefix))


# The CLIPTextConfig and CLIPVisionConfig keys CLIPModel holds as text_<key> and vision_<key>.
TEXT_KEYS = tower_keys("text_")
VISION_KEYS = tower_keys("vision_")
