"""``merge_replicas(config, workdir)``: DeMe's merge step, from finetuned replicas to one exported model.

The pretrained model gets identity projections (when the replicas have them),
task vectors are taken on the replicas' EMA weights, and the merge weights
come from a search scored on held-out data. The default score is the held-out
denoising loss of each replica interval divided by the pretrained model's on
that interval, averaged over intervals: unnormalised, the low-t interval's
loss (two orders of magnitude larger) would decide alone. ``fd_mnist`` and
``fid`` score samples instead (config.evaluate's sampler and sample count, one
noise seed shared by every candidate): closer to what the paper searched on,
and far slower.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers

from deme_jax.data import heldout_images
from deme_jax.deme.finetune import load_pretrained, load_replicas
from deme_jax.diffusion import make_schedule, sample_images
from deme_jax.interop import save_diffusers_unet, save_orbax_model
from deme_jax.merge import METHODS, merge
from deme_jax.merge.search import SEARCHES, coordinate_descent, grid_search
from deme_jax.metrics.scoring import Scorer, sample_noise
from deme_jax.randomness import stream_key
from deme_jax.train.step import make_interval_loss
from deme_jax.train.validate import ConfigError, require

METRICS = ("heldout_loss", "fd_mnist", "fid")


def validate_merge_config(merge_config, num_replicas: int) -> None:
    require(merge_config.method in METHODS,
            f"config.merge.method={merge_config.method!r}: use one of {list(METHODS)}.")
    require(merge_config.search in SEARCHES + ("none",),
            f"config.merge.search={merge_config.search!r}: use one of {list(SEARCHES) + ['none']}.")
    require(merge_config.metric in METRICS, f"config.merge.metric={merge_config.metric!r}: use one of {list(METRICS)}.")
    if merge_config.search == "none":
        weights = merge_config.weights
        require(weights is not None and len(weights) == num_replicas,
                f"config.merge.weights={weights}: give one weight per replica ({num_replicas}) for search='none'.")
    else:
        require(len(merge_config.weight_values) > 0,
                "config.merge.weight_values is empty: give the candidate weight values.")
    if merge_config.search == "grid" and len(merge_config.weight_values) ** num_replicas > 10_000:
        raise ConfigError(f"config.merge.search='grid' would score {len(merge_config.weight_values)}**{num_replicas} "
                          "candidates; use search='coordinate' for this many replicas.")


def merge_options(merge_config, seed: int) -> dict:
    if merge_config.method == "ties":
        return {"density": merge_config.ties_density}
    if merge_config.method == "dare":
        return {"drop_rate": merge_config.dare_drop_rate, "rng": stream_key(seed, "dare")}
    return {}


def make_score(config, run_config, model, schedule, interval_loss, reference):
    """``score(params) -> float`` (lower is better) for config.merge.metric."""
    metric = config.merge.metric
    if metric == "heldout_loss":
        return lambda params: float(np.mean(interval_loss(params) / reference))
    evaluation = config.evaluate.copy_and_resolve_references()
    evaluation.metrics = (metric,)
    scorer = Scorer(evaluation, run_config.data)
    data = run_config.data
    shape = (data.image_size, data.image_size, data.channels)

    def score(params) -> float:
        images = sample_images(model, params, schedule, evaluation.num_samples, shape, sample_noise(evaluation, 0),
                               evaluation.batch_size, evaluation.sampler, evaluation.ddim_steps, evaluation.eta)
        return float(scorer.score(images)[metric])

    return score


def merge_replicas(config, workdir: str | Path):
    """Searches merge weights for the replicas in ``workdir`` and writes the merged model; returns the result."""
    workdir = Path(workdir)
    model, replicas, partition, run_config = load_replicas(workdir)
    N = len(partition) - 1
    validate_merge_config(config.merge, N)
    out = workdir / "merge"
    for name in ("orbax", "diffusers"):
        if (out / name).exists():
            raise FileExistsError(f"{out / name} exists from an earlier merge: move it away to merge again.")
    *_, base = load_pretrained(run_config)
    shapes = jax.tree_util.tree_map(np.shape, base)
    require(shapes == jax.tree_util.tree_map(lambda x: np.shape(x)[1:], replicas),
            f"the replicas in {workdir} do not have the structure of config.deme.pretrained="
            f"{run_config.deme.pretrained!r} (with projections: {run_config.deme.channel_projection}); merge "
            "replicas with the model they were finetuned from.")
    schedule = make_schedule(**run_config.diffusion)
    images = heldout_images(run_config.data, config.eval.num_images)
    interval_loss = make_interval_loss(model, schedule, images, partition, stream_key(config.seed, "merge_heldout"))
    reference = interval_loss(base)
    options = merge_options(config.merge, config.seed)
    merged_fn = jax.jit(lambda w, base, replicas: merge(base, replicas, w, config.merge.method, **options))
    score_params = make_score(config, run_config, model, schedule, interval_loss, reference)

    writer = metric_writers.create_default_writer(out, just_logging=jax.process_index() > 0)

    def score(weights) -> float:
        return score_params(merged_fn(jnp.asarray(weights), base, replicas))

    def log_candidate(index, weights, value):
        writer.write_scalars(index, {"merge/score": value})
        logging.info("merge candidate %d: weights %s -> score %.5f", index, np.round(weights, 4).tolist(), value)

    values = tuple(config.merge.weight_values)
    if config.merge.search == "grid":
        best, best_score, candidates = grid_search(score, N, values, log_candidate)
    elif config.merge.search == "coordinate":
        best, best_score, candidates = coordinate_descent(score, N, values, config.merge.init,
                                                          config.merge.max_rounds, log_candidate)
    else:
        best = np.asarray(config.merge.weights, np.float32)
        best_score, candidates = score(best), []
    merged = merged_fn(jnp.asarray(best), base, replicas)
    pretrained_score = 1.0 if config.merge.metric == "heldout_loss" else score_params(base)
    result = {
        "method": config.merge.method, "search": config.merge.search, "metric": config.merge.metric,
        "partition": [int(b) for b in partition], "weights": best.tolist(), "score": best_score,
        "pretrained_score": pretrained_score,
        "interval_loss_ratio": (interval_loss(merged) / reference).tolist(),
        "pretrained_interval_loss": reference.tolist(),
        "candidates": [{"weights": list(w), "score": s} for w, s in candidates],
    }
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_orbax_model(model, merged, out / "orbax")
        save_diffusers_unet(model, merged, out / "diffusers")
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        if candidates:
            plot_search(candidates, pretrained_score, config.merge.metric, out / "search.png")
    writer.flush()
    logging.info("merged with weights %s: %s %.5f (pretrained %.5f) -> %s", best.tolist(), config.merge.metric,
                 best_score, pretrained_score, out)
    return result


def plot_search(candidates, pretrained_score: float, metric: str, path: Path) -> Path:
    """Every candidate's score in search order, with the best so far and the pretrained model's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.array([s for _, s in candidates])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(scores, ".", alpha=0.5, label="candidate")
    ax.plot(np.minimum.accumulate(scores), "-", label="best so far")
    ax.axhline(pretrained_score, color="gray", lw=0.8, ls="--", label="pretrained")
    ax.set_xlabel("candidate")
    ax.set_ylabel("held-out loss / pretrained\n(mean over intervals)" if metric == "heldout_loss" else metric)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
