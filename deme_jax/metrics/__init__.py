"""Sample-quality metrics: FID, KID and Inception Score with pytorch-fid's Inception-v3."""

from deme_jax.metrics.fid import (
    compute_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_inception,
    load_logits_head,
    load_statistics,
    save_statistics,
)
from deme_jax.metrics.fid_weights import convert_fid_weights, default_weights_path, find_fid_helper_weights

__all__ = [
    "compute_statistics", "convert_fid_weights", "default_weights_path", "find_fid_helper_weights",
    "frechet_distance", "inception_score", "kernel_inception_distance", "load_inception", "load_logits_head",
    "load_statistics", "save_statistics",
]
