"""``deme evaluate``: sample K images with the config's sampler and score them against reference images.

Metrics: ``fid`` (pytorch-fid's Inception FID), ``kid`` beside it, and
``fd_mnist`` (the fast digit-classifier distance, not FID). The reference is
config.data's held-out split, its training split, an image folder, or a
pytorch-fid ``.npz`` (FID only). Sampling is repeated over ``num_seeds``
initial-noise seeds, and every metric is reported per seed and as mean and
standard deviation: at a few hundred samples the noise alone moves FD by as
much as the differences between good models.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from deme_jax.data import heldout_images, make_source
from deme_jax.diffusion import ddim_sample, ddpm_sample
from deme_jax.images import save_image_grid, to_uint8
from deme_jax.models import param_shapes

METRICS = ("fid", "kid", "fd_mnist")


def default_evaluate_config() -> ml_collections.ConfigDict:
    """The ``config.evaluate`` fields."""
    return ml_collections.ConfigDict(dict(
        model="",  # "" = the workdir's model: DIR/merge/orbax if merged, else the run's EMA weights; or a path
        num_samples=1_000,  # per seed
        fid_samples=0,  # FID and KID on the first this-many samples (0: all); Inception is the slow part
        num_seeds=1,  # initial-noise seeds; the spread over them is reported
        batch_size=250,
        sampler="ddim",  # "ddim" or "ddpm" (every training timestep)
        ddim_steps=50,
        eta=0.0,
        metrics=("fid", "fd_mnist"),
        reference="heldout",  # "heldout", "train", an image folder, or pytorch-fid .npz statistics (FID only)
        num_reference=0,  # reference images to use (0: all there are)
        fid_weights="",  # our safetensors Inception weights (default: converted into the cache once)
        seed=1_000,  # the first seed; seed + k for repeat k
    ))


def sample_images(model, params, schedule, num: int, shape: tuple[int, int, int], seed: int, batch_size: int,
                  sampler: str = "ddim", ddim_steps: int = 50, eta: float = 0.0) -> np.ndarray:
    """``num`` uint8 samples of ``shape`` (H, W, C), drawn in batches, from the noise of ``seed``.

    Batch k's noise comes from ``fold_in(key(seed), k)``, so the first images
    do not depend on ``num`` or on the model: two models sampled with one seed
    start from the same noise.
    """
    batches, done, start = [], 0, time.perf_counter()
    for k in range(-(-num // batch_size)):
        n = min(batch_size, num - done)
        rng_noise, rng_steps = jax.random.split(jax.random.fold_in(jax.random.key(seed), k))
        noise = jax.random.normal(rng_noise, (batch_size, *shape))  # full batches: one compilation
        if sampler == "ddim":
            images = ddim_sample(model, params, schedule, noise, ddim_steps, eta, rng_steps if eta > 0 else None)
        else:
            images = ddpm_sample(model, params, schedule, noise, rng_steps)
        batches.append(to_uint8(np.asarray(images))[:n])
        done += n
        logging.info("sampled %d/%d images (%.0f s)", done, num, time.perf_counter() - start)
    return np.concatenate(batches)


def reference_images(reference: str, data_config, num: int = 0) -> np.ndarray:
    """uint8 reference images: config.data's held-out or training split, or an image folder."""
    if reference == "heldout":
        return to_uint8(heldout_images(data_config, num or None))
    if reference == "train":
        source = make_source(data_config)
        count = num or len(source)
        order = np.random.default_rng(0).permutation(len(source))[:count]  # sources may be sorted by class
        return np.stack([source[int(i)] for i in order])
    folder = ml_collections.ConfigDict(dict(data_config))
    folder.update(dict(name="folder", folder=reference))
    source = make_source(folder)
    return np.stack([source[i] for i in range(num or len(source))])


def rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


class Scorer:
    """Reference features computed once; ``score(images)`` gives every metric for one sample set."""

    def __init__(self, eval_config, data_config):
        from deme_jax.metrics import compute_statistics, load_inception, load_statistics

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
            from deme_jax.metrics.mnist_features import load_mnist_features

            self.digit_features = load_mnist_features()
            self.fd_reference = self.digit_features(images)

    def score(self, images: np.ndarray) -> dict[str, float]:
        from deme_jax.metrics import compute_statistics, frechet_distance, kernel_inception_distance

        scores = {}
        if self.inception is not None:
            features = self.inception(rgb(images[:self.fid_samples or None]))
            if "fid" in self.metrics:
                scores["fid"] = frechet_distance(*compute_statistics(features), *self.fid_reference)
            if "kid" in self.metrics:
                scores["kid"] = kernel_inception_distance(features, self.inception_reference)[0]
        if "fd_mnist" in self.metrics:
            from deme_jax.metrics.mnist_features import fd_mnist

            scores["fd_mnist"] = fd_mnist(self.digit_features(images), self.fd_reference)
        return scores


def evaluate_model(model, params, schedule, eval_config, data_config, scorer: Scorer | None = None) -> dict:
    """Samples and scores ``model`` over ``eval_config.num_seeds`` seeds.

    Returns per-seed and summary scores, and the first seed's ``samples`` (uint8),
    which start from the same noise for every model.
    """
    scorer = scorer or Scorer(eval_config, data_config)
    shape = (data_config.image_size, data_config.image_size, data_config.channels)
    per_seed, samples = [], None
    for k in range(eval_config.num_seeds):
        images = sample_images(model, params, schedule, eval_config.num_samples, shape, eval_config.seed + k,
                               eval_config.batch_size, eval_config.sampler, eval_config.ddim_steps, eval_config.eta)
        per_seed.append(scorer.score(images))
        logging.info("seed %d: %s", eval_config.seed + k, per_seed[-1])
        if k == 0:
            samples = images
    summary = {name: {"mean": float(np.mean([s[name] for s in per_seed])),
                      "std": float(np.std([s[name] for s in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0}
               for name in per_seed[0]}
    return {"per_seed": per_seed, "summary": summary, "samples": samples, "num_samples": eval_config.num_samples,
            "fid_samples": eval_config.fid_samples or eval_config.num_samples,
            "num_reference": scorer.num_reference, "sampler": eval_config.sampler,
            "ddim_steps": eval_config.ddim_steps}


def workdir_model(config, workdir: Path):
    """What ``deme evaluate`` scores: config.evaluate.model, else the merged model, else the run's EMA weights."""
    from deme_jax.train.checkpoints import load_model

    path = config.evaluate.model or (workdir / "merge" / "orbax" if (workdir / "merge" / "orbax").is_dir()
                                     else workdir)
    return str(path), *load_model(path)


def evaluate(config, workdir: str | Path) -> dict:
    """``deme evaluate --config=FILE --workdir=DIR``: writes DIR/eval/{results.json,samples.png} and TensorBoard."""
    from clu import metric_writers

    from deme_jax.train import build_schedule

    workdir = Path(workdir)
    path, model, params = workdir_model(config, workdir)
    if jax.tree_util.tree_map(np.shape, params) != jax.tree_util.tree_map(np.shape, param_shapes(model)):
        raise ValueError(f"{path} holds stacked DeMe replicas, not one model: run `deme merge` first.")
    out = workdir / "eval"
    result = evaluate_model(model, params, build_schedule(config.diffusion), config.evaluate, config.data)
    result["model"] = path
    out.mkdir(parents=True, exist_ok=True)
    save_image_grid(jnp.asarray(result.pop("samples")[:64], jnp.float32) / 127.5 - 1, out / "samples.png")
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    writer = metric_writers.create_default_writer(out)
    writer.write_scalars(0, {f"eval/{k}": v["mean"] for k, v in result["summary"].items()})
    writer.flush()
    logging.info("%s: %s -> %s", path, result["summary"], out / "results.json")
    return result
