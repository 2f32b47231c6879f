"""CLIP score: 100 x the cosine between CLIP's image and text embeddings, as torchmetrics' ``CLIPScore`` computes it.

torchmetrics averages the per-pair scores and clips the mean at 0 (its formula
reads max(100 cos, 0) per pair; its code clips the mean), so per-image scores
here are unclipped, and ``mean_score`` of the scores of every batch and seed is
the number torchmetrics reports for them all. Images are preprocessed as
transformers' ``CLIPImageProcessor`` does for the model's input size: shortest
side resized to it with Pillow's bicubic filter, center crop, 1/255, CLIP's mean
and std. The resize reproduces Pillow's 8-bit fixed-point arithmetic (coefficients
with 22 fraction bits, rounding and clipping after the horizontal and after the
vertical pass) in float64, where those integer sums are exact, so the pixel values
equal transformers' bit for bit.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from deme_jax.interop.diffusers import load_diffusers_model
from deme_jax.models.clip import CLIPModel, l2_normalize
from deme_jax.text2image.tokenizer import CLIPTokenizer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point fraction bits for 8-bit images


def bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5), in its order of operations."""
    a, x = -0.5, np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """(in_size, out_size) fixed-point coefficients of Pillow's antialiased bicubic resampling along one axis."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    weights = np.zeros((in_size, out_size))
    for j in range(out_size):
        center = (j + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        w = bicubic((np.arange(lo, hi) - center + 0.5) * (1.0 / filter_scale))
        w = w / np.add.accumulate(w)[-1]
        weights[lo:hi, j] = np.trunc(w * (1 << PRECISION_BITS) + np.copysign(0.5, w))
    return weights


def resample(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """One of Pillow's passes over 8-bit values held in float64."""
    x = np.moveaxis(x, axis, -1)
    sums = x @ resize_weights(x.shape[-1], out_size) + (1 << (PRECISION_BITS - 1))
    return np.moveaxis(np.clip(np.floor(sums / (1 << PRECISION_BITS)), 0, 255), -1, axis)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """The shortest side to ``size``, the other truncated, as transformers' ``get_resize_output_image_size``."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def preprocess(images: np.ndarray, size: int) -> np.ndarray:
    """(B, H, W, 3) uint8 images, or float ones in [0, 1] (rounded to 8 bits first, as saving them would), ->
    (B, size, size, 3) float32 pixel values for CLIP's vision tower."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"CLIP score takes a batch of RGB images (B, H, W, 3), got shape {images.shape}.")
    if np.issubdtype(images.dtype, np.floating):
        images = np.clip(np.round(images * 255.0), 0, 255)
    elif images.dtype != np.uint8:
        raise ValueError(f"CLIP score takes uint8 images or float ones in [0, 1], got {images.dtype}.")
    height, width = resized_shape(*images.shape[1:3], size)
    x = resample(resample(images.astype(np.float64), 2, width), 1, height)  # Pillow: horizontal pass first
    top, left = (height - size) // 2, (width - size) // 2
    x = (x[:, top:top + size, left:left + size] * (1 / 255)).astype(np.float32)
    return (x - np.float32(OPENAI_CLIP_MEAN)) / np.float32(OPENAI_CLIP_STD)


@partial(jax.jit, static_argnums=0)
def pair_scores(model: CLIPModel, params: dict, pixel_values: jax.Array, input_ids: jax.Array) -> jax.Array:
    """100 x the cosine of each image with its own text, unclipped."""
    image = l2_normalize(model.apply({"params": params}, pixel_values, method=model.get_image_features))
    text = l2_normalize(model.apply({"params": params}, input_ids, method=model.get_text_features))
    return 100 * jnp.sum(image * text, axis=-1)


def mean_score(scores) -> float:
    """torchmetrics' CLIP score of the pairs scored: their mean, clipped at 0."""
    return max(float(np.mean(scores)), 0.0)


def clip_score(model: CLIPModel, params: dict, images: np.ndarray, input_ids: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-image scores (unclipped) and their ``mean_score`` for images (B, H, W, 3) and the token ids (B, L) of
    their captions (padded after the end token: the causal mask keeps padding out of the pooled state)."""
    pixel_values, input_ids = preprocess(images, model.vision_image_size), np.asarray(input_ids)
    if input_ids.ndim != 2 or len(input_ids) != len(pixel_values):
        raise ValueError(f"Expected token ids (B, L) for {len(pixel_values)} images, got shape {input_ids.shape}.")
    scores = np.asarray(pair_scores(model, params, pixel_values, input_ids))
    return scores, mean_score(scores)


class CLIPScorer:
    """A CLIP model with its parameters and tokenizer: ``scorer(images, captions)`` -> ``clip_score``."""

    def __init__(self, model: CLIPModel, params: dict, tokenizer):
        self.model, self.params, self.tokenizer = model, params, tokenizer

    @classmethod
    def from_directory(cls, path: str | Path) -> CLIPScorer:
        """A transformers CLIP directory (config.json, model.safetensors and the tokenizer's files)."""
        model, params = load_diffusers_model(path)
        if not isinstance(model, CLIPModel):
            raise ValueError(f"{path} holds a {type(model).__name__}, not a CLIPModel: CLIP score needs both towers.")
        return cls(model, params, CLIPTokenizer.from_directory(path))

    def __call__(self, images: np.ndarray, captions: list[str]) -> tuple[np.ndarray, float]:
        return clip_score(self.model, self.params, images, self.tokenizer(captions))
