"""Sampling a model and scoring the samples against reference images: what `deme evaluate`, the merge
search and the demo share.

Metrics: ``fid`` (pytorch-fid's Inception FID), ``kid`` beside it, and
``fd_mnist`` (the fast digit-classifier distance, not FID). The reference is
config.data's held-out split, its training split, an image folder, or a
pytorch-fid ``.npz`` (FID only). Sampling is repeated over ``num_seeds``
initial-noise seeds, and every metric is reported per seed and as mean and
standard deviation: at a few hundred samples the noise alone moves FD by as
much as the differences between good models.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from deme_jax.data import reference_images
from deme_jax.images import to_uint8
from deme_jax.diffusion import sample_images
from deme_jax.metrics.fid import (
    compute_statistics,
    frechet_distance,
    kernel_inception_distance,
    load_inception,
    load_statistics,
)
from deme_jax.metrics.mnist_features import fd_mnist, load_mnist_features
from deme_jax.randomness import stream_key
from deme_jax.text2image import SCHEDULERS, generate

METRICS = ("fid", "kid", "fd_mnist")
TEXT_TO_IMAGE_METRICS = ("fid", "kid", "clip_score")


def rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


class Scorer:
    """Reference features computed once; ``score(images)`` gives every metric for one sample set."""

    def __init__(self, eval_config, data_config):
        metrics = tuple(eval_config.metrics)
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"config.evaluate.metrics has {unknown}; supported: {list(METRICS)}.")
        self.metrics = metrics
        self.fid_samples = eval_config.fid_samples
        npz = str(eval_config.reference).endswith(".npz")
        if npz and set(metrics) - {"fid"}:
            raise ValueError(f"config.evaluate.reference={eval_config.reference!r} holds FID statistics only; "
                             "drop the other metrics or give an image reference.")
        images = None if npz else reference_images(eval_config.reference, data_config, eval_config.num_reference)
        self.num_reference = None if images is None else len(images)
        self.inception = None
        if {"fid", "kid"} & set(metrics):
            self.inception = load_inception(eval_config.fid_weights or None)
            if npz:
                self.fid_reference = load_statistics(eval_config.reference)
            else:
                self.inception_reference = self.inception(rgb(images))
                self.fid_reference = compute_statistics(self.inception_reference)
        if "fd_mnist" in metrics:
            self.digit_features = load_mnist_features()
            self.fd_reference = self.digit_features(images)

    def score(self, images: np.ndarray) -> dict[str, float]:
        scores = {}
        if self.inception is not None:
            features = self.inception(rgb(images[:self.fid_samples or None]))
            if "fid" in self.metrics:
                scores["fid"] = frechet_distance(*compute_statistics(features), *self.fid_reference)
            if "kid" in self.metrics:
                scores["kid"] = kernel_inception_distance(features, self.inception_reference)[0]
        if "fd_mnist" in self.metrics:
            scores["fd_mnist"] = fd_mnist(self.digit_features(images), self.fd_reference)
        return scores


def sample_noise(eval_config, k: int) -> jax.Array:
    """The initial noise of repeat ``k``: the same for every model scored with one config.evaluate.seed."""
    return stream_key(eval_config.seed, "eval_noise", k)


def summarise(per_seed: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every metric."""
    return {name: {"mean": float(np.mean([s[name] for s in per_seed])),
                   "std": float(np.std([s[name] for s in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0}
            for name in per_seed[0]}


def evaluate_model(model, params, schedule, eval_config, data_config, scorer: Scorer | None = None) -> dict:
    """Samples and scores ``model`` over ``eval_config.num_seeds`` seeds.

    Returns per-seed and summary scores, and the first seed's ``samples`` (uint8),
    which start from the same noise for every model.
    """
    scorer = scorer or Scorer(eval_config, data_config)
    shape = (data_config.image_size, data_config.image_size, data_config.channels)
    per_seed, samples = [], None
    for k in range(eval_config.num_seeds):
        images = sample_images(model, params, schedule, eval_config.num_samples, shape, sample_noise(eval_config, k),
                               eval_config.batch_size, eval_config.sampler, eval_config.ddim_steps, eval_config.eta)
        per_seed.append(scorer.score(images))
        logging.info("noise seed %d: %s", k, per_seed[-1])
        if k == 0:
            samples = images
    return {"per_seed": per_seed, "summary": summarise(per_seed), "samples": samples,
            "num_samples": eval_config.num_samples,
            "fid_samples": eval_config.fid_samples or eval_config.num_samples,
            "num_reference": scorer.num_reference, "sampler": eval_config.sampler,
            "ddim_steps": eval_config.ddim_steps}


def read_prompts(path: str) -> list[str]:
    """The non-empty lines of a prompt file."""
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()] if path else []
    if not prompts:
        raise ValueError(f"config.evaluate.prompts={path!r} holds no prompt: give a text file with one caption per "
                         "line (the COCO protocol: 30,000 val2014 captions).")
    return prompts


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images resized to size x size (PIL bicubic), as the COCO protocol downsamples samples before FID."""
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BICUBIC)) for x in images])


class TextToImageScorer:
    """The COCO protocol's scoring, set up once (prompts, reference features, the CLIP model):
    ``images, scores = scorer(pipeline, k)`` samples the pipeline for the prompts with seed ``k``'s latents.

    One image per prompt of ``eval_config.prompts`` (the first ``num_samples``), guided (``guidance_scale``) by
    DDIM, DPM-Solver++ or PNDM (``sampler``, ``ddim_steps`` steps) at the pipeline's resolution; FID and KID of the
    images resized to ``fid_resolution`` against ``eval_config.reference`` (an image folder, read as
    ``data_config`` reads one, at that size; or pytorch-fid ``.npz`` statistics), and the CLIP score of the
    full-size images with their prompts (``clip_model``, a transformers CLIP directory). Seed ``k``'s latents are
    stream ``eval_noise`` k: the same for every model scored with one config.
    """

    def __init__(self, eval_config, data_config):
        from deme_jax.metrics.clip_score import CLIPScorer

        metrics = tuple(eval_config.metrics)
        unknown = sorted(set(metrics) - set(TEXT_TO_IMAGE_METRICS))
        if unknown:
            raise ValueError(f"config.evaluate.metrics has {unknown}; a text-to-image model is scored with "
                             f"{list(TEXT_TO_IMAGE_METRICS)}.")
        if eval_config.sampler not in SCHEDULERS:
            raise ValueError(f"config.evaluate.sampler={eval_config.sampler!r}: a text-to-image model samples with "
                             f"one of {', '.join(map(repr, SCHEDULERS))}.")
        self.config = eval_config
        self.prompts = read_prompts(eval_config.prompts)[:eval_config.num_samples]
        self.clip = None
        if "clip_score" in metrics:
            if not eval_config.clip_model:
                raise ValueError("config.evaluate.metrics has 'clip_score' but config.evaluate.clip_model is empty: "
                                 "give a transformers CLIP directory (the paper: ViT-g/14), or drop the metric.")
            self.clip = CLIPScorer.from_directory(eval_config.clip_model)
        image_metrics = tuple(m for m in metrics if m != "clip_score")
        self.images = None
        if image_metrics:
            if eval_config.reference in ("heldout", "train"):
                raise ValueError(f"config.evaluate.reference={eval_config.reference!r}: a text-to-image model's FID "
                                 "reference is an image folder (e.g. COCO val2014) or pytorch-fid .npz statistics.")
            reference = ml_collections.ConfigDict(data_config.to_dict())  # a folder read at fid_resolution, in RGB
            reference.update(dict(image_size=eval_config.fid_resolution, channels=3))
            self.images = Scorer(ml_collections.ConfigDict({**eval_config.to_dict(), "metrics": image_metrics}),
                                 reference)

    def __call__(self, pipeline, k: int) -> tuple[np.ndarray, dict[str, float]]:
        config, unet, prompts = self.config, pipeline.unet, self.prompts
        latents = jax.random.normal(sample_noise(config, k), (len(prompts), unet.sample_size, unet.sample_size,
                                                              unet.in_channels))
        images = []
        for i in range(0, len(prompts), config.batch_size):
            chunk = slice(i, i + config.batch_size)
            batch = generate(pipeline, prompts[chunk], latents=latents[chunk], scheduler=config.sampler,
                             num_inference_steps=config.ddim_steps, guidance_scale=config.guidance_scale)
            images.append(to_uint8(batch * 2 - 1))
            logging.info("seed %d: %d/%d images", k, i + len(batch), len(prompts))
        images = np.concatenate(images)
        scores = self.images.score(resize_uint8(images, config.fid_resolution)) if self.images else {}
        if self.clip is not None:
            scores["clip_score"] = self.clip(images, prompts)[1]
        return images, scores


def evaluate_pipeline(pipeline, eval_config, data_config) -> dict:
    """``TextToImageScorer``'s scores of ``pipeline`` over ``eval_config.num_seeds`` seeds, and their spread."""
    scorer = TextToImageScorer(eval_config, data_config)
    per_seed, samples = [], None
    for k in range(eval_config.num_seeds):
        images, scores = scorer(pipeline, k)
        per_seed.append(scores)
        logging.info("noise seed %d: %s", k, scores)
        samples = images if k == 0 else samples
    return {"per_seed": per_seed, "summary": summarise(per_seed), "samples": samples,
            "num_samples": len(scorer.prompts), "resolution": samples.shape[1],
            "fid_resolution": eval_config.fid_resolution,
            "num_reference": scorer.images.num_reference if scorer.images else None, "sampler": eval_config.sampler,
            "steps": eval_config.ddim_steps, "guidance_scale": eval_config.guidance_scale}
