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

``search="gradient"`` learns the weights instead of gridding them: the merge
sits inside the jitted loss, so each Adam step costs one forward and backward
of the model on the fit images whatever N, and the weights can be per replica
or per replica and block. It fits on part of the held-out images and stops on
the rest, so the weights cannot follow one image set's noise for long.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers

from deme_jax.deme.data import heldout_batch, num_rows, rows
from deme_jax.deme.finetune import load_pretrained, load_pretrained_pipeline, load_replicas, lora_scale
from deme_jax.diffusion import make_schedule, sample_images
from deme_jax.diffusion.timesteps import interval_index, interval_labels, interval_means, spread_timesteps
from deme_jax.interop import save_diffusers_unet, save_lora, save_orbax_model, save_stable_diffusion
from deme_jax.merge import METHODS, merge, weight_groups
from deme_jax.models import LoRAModel, merged_adapters
from deme_jax.merge.search import SEARCHES, coordinate_descent, gradient_search, grid_search
from deme_jax.metrics.scoring import Scorer, TextToImageScorer, sample_noise
from deme_jax.randomness import stream_key
from deme_jax.text2image.latent_cache import weights_fingerprint
from deme_jax.train.step import make_heldout_losses, make_interval_loss, microbatch_size
from deme_jax.train.validate import ConfigError, require

PIXEL_METRICS = ("heldout_loss", "fd_mnist", "fid")
TEXT_TO_IMAGE_METRICS = ("heldout_loss", "fid", "clip_score")
METRICS = tuple(dict.fromkeys(PIXEL_METRICS + TEXT_TO_IMAGE_METRICS))
GRANULARITIES = ("replica", "block")
PENALTY_TARGETS = ("uniform", "grid")


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
    if merge_config.search == "gradient":
        validate_gradient_search(merge_config)
    grid = merge_config.search == "grid" or (merge_config.search == "gradient"
                                             and merge_config.penalty_target == "grid")
    if grid or merge_config.search == "coordinate":
        require(len(merge_config.weight_values) > 0,
                "config.merge.weight_values is empty: give the candidate weight values.")
    if grid and len(merge_config.weight_values) ** num_replicas > 10_000:
        raise ConfigError(f"config.merge.search={merge_config.search!r} would grid {len(merge_config.weight_values)}**"
                          f"{num_replicas} candidates; use search='coordinate', or search='gradient' with "
                          "penalty_target='uniform', for this many replicas.")


def validate_gradient_search(merge_config) -> None:
    require(merge_config.metric == "heldout_loss",
            f"config.merge.metric={merge_config.metric!r} has no gradient: search='gradient' needs "
            "metric='heldout_loss' (use search='grid' or 'coordinate' to score samples).")
    require(merge_config.granularity in GRANULARITIES,
            f"config.merge.granularity={merge_config.granularity!r}: use one of {list(GRANULARITIES)}.")
    require(merge_config.penalty_target in PENALTY_TARGETS,
            f"config.merge.penalty_target={merge_config.penalty_target!r}: use one of {list(PENALTY_TARGETS)}.")
    require(merge_config.penalty >= 0,
            f"config.merge.penalty={merge_config.penalty} is negative, which would push the weights away from the "
            f"{merge_config.penalty_target} start without bound: use 0 (no pull) or a positive value.")
    require(merge_config.max_steps >= 1 and merge_config.patience >= 1,
            f"config.merge.max_steps={merge_config.max_steps} and patience={merge_config.patience} must be >= 1.")
    require(merge_config.lr > 0, f"config.merge.lr={merge_config.lr} must be > 0.")
    require(0 < merge_config.stop_fraction < 1,
            f"config.merge.stop_fraction={merge_config.stop_fraction} must lie in (0, 1): the gradient search fits "
            "on the other held-out images and stops early on these.")


def check_covers(num_images: int, partition, what: str) -> None:
    """Raises unless ``num_images`` spread timesteps put at least one image in every interval of ``partition``."""
    t = spread_timesteps(num_images, int(partition[-1]))
    hit = set(np.asarray(interval_index(t, partition)).tolist())
    empty = [f"[{a}, {b})" for i, (a, b) in enumerate(zip(partition[:-1], partition[1:])) if i not in hit]
    require(not empty, f"{what}: {num_images} held-out images at evenly spread timesteps leave the interval(s) "
                       f"{', '.join(empty)} without one; raise config.eval.num_images.")


def merge_options(merge_config, seed: int) -> dict:
    if merge_config.method == "ties":
        return {"density": merge_config.ties_density}
    if merge_config.method == "dare":
        return {"drop_rate": merge_config.dare_drop_rate, "rng": stream_key(seed, "dare")}
    return {}


def make_score(config, run_config, model, schedule, interval_loss, reference, pipeline=None):
    """``score(params) -> float`` (lower is better: the CLIP score enters negated) for config.merge.metric.

    Sample metrics use config.evaluate's sampler, sample count and first noise seed; a Stable Diffusion
    ``pipeline`` is scored with the merged UNet in it, by the COCO protocol (``TextToImageScorer``).
    """
    metric = config.merge.metric
    if metric == "heldout_loss":
        return lambda params: float(np.mean(interval_loss(params) / reference))
    evaluation = config.evaluate.copy_and_resolve_references()
    evaluation.metrics = (metric,)
    if pipeline is not None:
        scorer, sign = TextToImageScorer(evaluation, run_config.data), -1.0 if metric == "clip_score" else 1.0
        return lambda params: sign * scorer(pipeline.with_unet(model, params), 0)[1][metric]
    scorer = Scorer(evaluation, run_config.data)
    data = run_config.data
    shape = (data.image_size, data.image_size, data.channels)

    def score(params) -> float:
        images = sample_images(model, params, schedule, evaluation.num_samples, shape, sample_noise(evaluation, 0),
                               evaluation.batch_size, evaluation.sampler, evaluation.ddim_steps, evaluation.eta)
        return float(scorer.score(images)[metric])

    return score


def make_merged_losses(model, schedule, partition, method: str = "task_arithmetic", chunk: int | None = None,
                       **options):
    """``losses(weights, base, replicas, images, rng, reference) -> (N,)``: the held-out loss per interval of
    the model merged with ``weights``, over ``reference``; the merge runs inside, so it is differentiable in the
    weights at the cost of one backward pass of the model (``chunk`` rows at a time)."""
    heldout = make_heldout_losses(model, schedule, chunk)

    def losses(weights, base, replicas, images, rng, reference):
        merged = merge(base, replicas, weights, method, **options)
        return interval_means(*heldout(merged, images, rng), partition) / reference

    return losses


def learn_weights(config, model, schedule, partition, base, replicas, images, writer, chunk: int | None = None):
    """Gradient descent on the merge weights (config.merge.search="gradient"); returns (weights, candidates of
    the grid it starts from, details). ``images``: the held-out batch (images, or latents and text states)."""
    settings, N = config.merge, len(partition) - 1
    num_stop = max(1, round(settings.stop_fraction * num_rows(images)))
    fit, stop = rows(images, slice(None, -num_stop)), rows(images, slice(-num_stop, None))
    check_covers(num_rows(fit), partition, f"config.merge.stop_fraction={settings.stop_fraction} (fit images)")
    check_covers(num_rows(stop), partition, f"config.merge.stop_fraction={settings.stop_fraction} (held-back images)")
    relative_losses = make_merged_losses(model, schedule, partition, settings.method, chunk,
                                         **merge_options(settings, config.seed))
    losses = jax.jit(relative_losses)  # the search's held-back loss compiles the same function: compiled once

    def args(images, stream):
        rng = stream_key(config.seed, stream)  # zero weights merge to the pretrained model: its loss per interval
        reference = losses(np.zeros(N, np.float32), base, replicas, images, rng, np.ones(N, np.float32))
        return base, replicas, images, rng, reference

    fit_args, stop_args = args(fit, "merge_heldout"), args(stop, "merge_stop")
    candidates = []
    if settings.penalty_target == "grid":
        score = lambda w: float(np.mean(losses(w, *fit_args)))
        start, _, candidates = grid_search(score, N, tuple(settings.weight_values))
    else:
        start = np.full(N, 1.0 / N, np.float32)
    groups = weight_groups(base)
    if settings.granularity == "block":
        start = np.repeat(start[:, None], len(groups), axis=1)
    labels = interval_labels(partition)

    def log_step(step, fit_losses, stop_losses):
        writer.write_scalars(step, {"merge/fit": fit_losses.mean(), "merge/stop": stop_losses.mean(),
                                    **{f"merge/fit/{k}": v for k, v in zip(labels, fit_losses)},
                                    **{f"merge/stop/{k}": v for k, v in zip(labels, stop_losses)}})
        logging.info("merge step %d: relative loss %.5f (fit), %.5f (held back)", step, fit_losses.mean(),
                     stop_losses.mean())

    weights, best_step, trace = gradient_search(relative_losses, start, fit_args, stop_args, settings.max_steps,
                                                settings.lr, settings.penalty, settings.patience, log_step)
    details = {"granularity": settings.granularity, "penalty_target": settings.penalty_target,
               "penalty": settings.penalty, "start": start.tolist(), "best_step": best_step,
               "steps": len(trace) - 1, "fit_images": num_rows(fit), "stop_images": num_rows(stop),
               "trace": [{"fit": f.tolist(), "stop": s.tolist()} for f, s in trace]}
    if settings.granularity == "block":
        details["groups"] = list(groups)
    return weights, candidates, details


def merge_replicas(config, workdir: str | Path, out: str | Path | None = None):
    """Searches merge weights for the replicas in ``workdir`` and writes the merged model to ``out`` (default
    ``workdir/merge``); returns the result."""
    workdir = Path(workdir)
    model, replicas, partition, run_config = load_replicas(workdir)
    N = len(partition) - 1
    validate_merge_config(config.merge, N)
    out = Path(out) if out else workdir / "merge"
    for name in ("orbax", "diffusers", "lora"):
        if (out / name).exists():
            raise FileExistsError(f"{out / name} exists from an earlier merge: move it away to merge again.")
    pipeline = load_pretrained_pipeline(run_config)
    metrics = PIXEL_METRICS if pipeline is None else TEXT_TO_IMAGE_METRICS
    require(config.merge.metric in metrics,
            f"config.merge.metric={config.merge.metric!r} does not score this model: use one of {list(metrics)}.")
    _, teacher_params, _, base = load_pretrained(run_config, pipeline)
    adapters = None
    if run_config.deme.get("lora"):  # task vectors of LoRA replicas are their dense deltas: merge the dense replicas
        adapters, lora = replicas["lora"], LoRAModel(model, lora_scale(run_config.deme))
        replicas = jax.jit(jax.vmap(lambda p: lora.dense(p, teacher_params)))(replicas)
    shapes = jax.tree_util.tree_map(np.shape, base)
    require(shapes == jax.tree_util.tree_map(lambda x: np.shape(x)[1:], replicas),
            f"the replicas in {workdir} do not have the structure of config.deme.pretrained="
            f"{run_config.deme.pretrained!r} (with projections: {run_config.deme.channel_projection}); merge "
            "replicas with the model they were finetuned from.")
    schedule = make_schedule(**run_config.diffusion)
    images = heldout_batch(run_config, workdir, config.eval.num_images,
                           None if pipeline is None else weights_fingerprint(pipeline))
    check_covers(num_rows(images), partition, f"config.eval.num_images={config.eval.num_images}")
    chunk = microbatch_size(run_config.train)  # the finetuning's forward batch: what memory is known to hold
    interval_loss = make_interval_loss(model, schedule, images, partition, stream_key(config.seed, "merge_heldout"),
                                       chunk)
    reference = interval_loss(base)
    options = merge_options(config.merge, config.seed)
    merged_fn = jax.jit(lambda w, base, replicas: merge(base, replicas, w, config.merge.method, **options))
    score_params = make_score(config, run_config, model, schedule, interval_loss, reference, pipeline)

    writer = metric_writers.create_default_writer(out, just_logging=jax.process_index() > 0)

    def score(weights) -> float:
        return score_params(merged_fn(jnp.asarray(weights), base, replicas))

    def log_candidate(index, weights, value):
        writer.write_scalars(index, {"merge/score": value})
        logging.info("merge candidate %d: weights %s -> score %.5f", index, np.round(weights, 4).tolist(), value)

    values, details = tuple(config.merge.weight_values), {}
    if config.merge.search == "grid":
        best, best_score, candidates = grid_search(score, N, values, log_candidate)
    elif config.merge.search == "coordinate":
        best, best_score, candidates = coordinate_descent(score, N, values, config.merge.init,
                                                          config.merge.max_rounds, log_candidate)
    elif config.merge.search == "gradient":
        best, candidates, details = learn_weights(config, model, schedule, partition, base, replicas, images, writer,
                                                  chunk)
        best_score = score(best)
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
        **details,
    }
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_orbax_model(model, merged, out / "orbax")
        if pipeline is None:
            save_diffusers_unet(model, merged, out / "diffusers")
        else:  # the whole pipeline with the merged UNet
            save_stable_diffusion(pipeline.with_unet(model, merged), out / "diffusers")
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        if adapters is not None:
            export_adapters(config, run_config, adapters, best, weight_groups(base), out / "lora")
        if details:
            plot_gradient_search(details["trace"], details["best_step"], partition, out / "search.png")
        elif candidates:
            plot_search(candidates, pretrained_score, config.merge.metric, out / "search.png")
    writer.flush()
    logging.info("merged with weights %s: %s %.5f (pretrained %.5f) -> %s", best.tolist(), config.merge.metric,
                 best_score, pretrained_score, out)
    return result


def export_adapters(config, run_config, adapters, weights, groups, path: Path) -> None:
    """The merged LoRA replicas as one adapter set in the diffusers/peft layout, where one expresses the merge:
    task arithmetic (rank N r) of replicas without channel projections (which LoRA files cannot hold)."""
    if config.merge.method != "task_arithmetic" or run_config.deme.channel_projection:
        logging.info("No LoRA export: the merge (method %s, channel projections %s) is not a sum of the adapters; "
                     "the merged model is in orbax/ and diffusers/.", config.merge.method,
                     run_config.deme.channel_projection)
        return
    save_lora(merged_adapters(adapters, weights, groups), path, lora_scale(run_config.deme))
    logging.info("The merge as LoRA weights: %s", path)


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


def plot_gradient_search(trace, best_step: int, partition, path: Path) -> Path:
    """The held-out loss per interval (relative to the pretrained model's) at every step of the gradient search,
    on the fit images and on the held-back ones, with the step kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, part, title in zip(axes, ("fit", "stop"), ("fit images", "held-back images (early stopping)")):
        values = np.array([step[part] for step in trace])
        for k, (a, b) in enumerate(zip(partition[:-1], partition[1:])):
            ax.plot(values[:, k], lw=1, label=f"t in [{a}, {b})")
        ax.plot(values.mean(1), "k-", lw=2, label="mean")
        ax.axvline(best_step, color="gray", ls="--", lw=0.8, label="kept")
        ax.axhline(1.0, color="gray", ls=":", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("Adam step")
    axes[0].set_ylabel("held-out loss / pretrained")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
