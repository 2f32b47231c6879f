"""``deme analyze``: the gradient-conflict heatmap and the loss-landscape contours of a model.

    deme analyze --config=FILE --workdir=DIR   # writes DIR/analysis/*

The model is config.analyze.model, else DIR's: for a DeMe finetuning workdir
its pretrained model, for a training workdir its EMA weights. The landscape's
directions are the task vectors of the first and last replicas when DIR holds
replicas ("task_vectors"), else filter-normalised random directions ("random").
A run with partition="conflict" also gets its fine bins' similarity with the
intervals it chose drawn on it (analysis/conflict_partition.png).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from absl import logging

from deme_jax.analysis import filter_normalized_direction, gradient_conflict, landscape, plot_conflict, plot_landscape
from deme_jax.data import heldout_images, training_batches
from deme_jax.deme import load_pretrained, load_replicas
from deme_jax.deme.finetune import PARTITION_FILE
from deme_jax.diffusion import make_schedule
from deme_jax.diffusion.timesteps import uniform_partition
from deme_jax.interop import is_training_workdir, load_model, run_config
from deme_jax.merge import task_vectors
from deme_jax.randomness import stream_key, stream_seed

DIRECTIONS = ("auto", "random", "task_vectors")


def run(config, workdir: str | Path) -> dict:
    """Writes DIR/analysis/{gradient_conflict.png,.npy, landscape.png,.npz, summary.json}; returns the summary."""
    workdir = Path(workdir)
    settings = config.analyze
    if settings.directions not in DIRECTIONS:
        raise ValueError(f"config.analyze.directions={settings.directions!r}: use one of {list(DIRECTIONS)}.")
    replicas = None
    boundaries = uniform_partition(config.diffusion.num_train_timesteps, settings.num_intervals)
    stored = run_config(workdir) or {}
    if settings.model:
        model, params = load_model(settings.model)
    elif "deme" in stored:
        _, replicas, boundaries, finetune_config = load_replicas(workdir)
        model, params, student, base = load_pretrained(finetune_config)
    elif is_training_workdir(workdir):
        model, params = load_model(workdir)
    elif "deme" in config and config.deme.pretrained:
        model, params = load_model(config.deme.pretrained)
    else:
        raise FileNotFoundError(f"{workdir} holds no run to analyse; set config.analyze.model to a model path.")
    schedule = make_schedule(**config.diffusion)
    out = workdir / "analysis"

    logging.info("gradient conflict over %s", boundaries.tolist())
    batches = training_batches(config.data, settings.num_batches, settings.num_images,
                               stream_seed(settings.seed, "gradient_conflict"))
    conflict = gradient_conflict(model, params, schedule, batches, boundaries,
                                 stream_key(settings.seed, "gradient_conflict"))

    directions = settings.directions
    if directions == "auto":
        directions = "task_vectors" if replicas is not None else "random"
    if directions == "task_vectors":
        if replicas is None:
            raise ValueError("config.analyze.directions='task_vectors' needs a DeMe finetuning workdir.")
        taus = task_vectors(base, replicas)
        d1, d2 = (jax.tree_util.tree_map(lambda x, i=i: x[i], taus) for i in (0, len(boundaries) - 2))
        center, landscape_model, labels = base, student, ("task vector 1 (low t)", "task vector N (high t)")
    else:
        r1, r2 = jax.random.split(stream_key(settings.seed, "directions"))
        d1, d2 = filter_normalized_direction(params, r1), filter_normalized_direction(params, r2)
        center, landscape_model, labels = params, model, ("random direction 1", "random direction 2")
    coordinates = np.linspace(-settings.span, settings.span, settings.grid_size)
    images = heldout_images(config.data, settings.landscape_images)
    logging.info("loss landscape on a %dx%d grid along %s", settings.grid_size, settings.grid_size, directions)
    grid = landscape(landscape_model, center, schedule, images, d1, d2, boundaries, coordinates,
                     stream_key(settings.seed, "landscape"))

    center_index = settings.grid_size // 2
    summary = {
        "boundaries": [int(b) for b in boundaries],
        "gradient_cosine": conflict.tolist(),
        "directions": directions,
        "landscape_minimum": [  # where each range's loss is lowest on the plane
            {"range": name, "a": float(coordinates[j]), "b": float(coordinates[i]), "loss": float(values[i, j]),
             "loss_at_center": float(values[center_index, center_index])}
            for name, values in zip(["all"] + [f"{a}-{b}" for a, b in zip(boundaries[:-1], boundaries[1:])], grid)
            for i, j in [np.unravel_index(np.argmin(values), values.shape)]],
    }
    chosen = json.loads((workdir / PARTITION_FILE).read_text()) if (workdir / PARTITION_FILE).is_file() else None
    if chosen is not None:
        summary["conflict_partition"] = chosen["boundaries"]
    if jax.process_index() > 0:  # every process computed the same; one writes
        return summary
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "gradient_conflict.npy", conflict)
    plot_conflict(conflict, boundaries, out / "gradient_conflict.png")
    np.savez(out / "landscape.npz", loss=grid, coordinates=coordinates, boundaries=boundaries)
    plot_landscape(grid, coordinates, boundaries, out / "landscape.png", labels)
    if chosen is not None:
        plot_conflict(np.asarray(chosen["similarity"]), chosen["bins"], out / "conflict_partition.png",
                      chosen["boundaries"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logging.info("wrote %s", out)
    return summary
