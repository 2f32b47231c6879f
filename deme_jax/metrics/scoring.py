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

import jax
import numpy as np
from absl import logging

from deme_jax.data import reference_images
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

METRICS = ("fid", "kid", "fd_mnist")


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
    summary = {name: {"mean": float(np.mean([s[name] for s in per_seed])),
                      "std": float(np.std([s[name] for s in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0}
               for name in per_seed[0]}
    return {"per_seed": per_seed, "summary": summary, "samples": samples, "num_samples": eval_config.num_samples,
            "fid_samples": eval_config.fid_samples or eval_config.num_samples,
            "num_reference": scorer.num_reference, "sampler": eval_config.sampler,
            "ddim_steps": eval_config.ddim_steps}
