"""``deme evaluate --config=FILE --workdir=DIR``: samples a workdir's model and scores it (FID, KID, FD-MNIST; for
a Stable Diffusion pipeline, FID, KID and CLIP score of images for a prompt file).

Writes DIR/eval/{results.json,samples.png} and TensorBoard scalars; what is
sampled and scored is config.evaluate (see deme_jax.defaults and
deme_jax.metrics.scoring).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers

from deme_jax.diffusion import make_schedule
from deme_jax.images import save_image_grid
from deme_jax.interop import load_model, load_stable_diffusion
from deme_jax.metrics.scoring import evaluate_model, evaluate_pipeline
from deme_jax.models import param_shapes


def model_to_score(path: Path) -> tuple[Path, bool]:
    """``(what to score, whether it is a Stable Diffusion directory)`` for a model path or a workdir: a pipeline
    directory (the path, or the merge's ``merge/diffusers``), else the merge's ``merge/orbax``, else the path
    itself (any model ``load_model`` reads: a training workdir gives its EMA weights)."""
    for candidate in (path, path / "merge" / "diffusers"):
        if (candidate / "model_index.json").is_file():
            return candidate, True
    return (path / "merge" / "orbax" if (path / "merge" / "orbax").is_dir() else path), False


def run(config, workdir: str | Path) -> dict:
    """Scores config.evaluate.model, else the workdir's model; returns what DIR/eval/results.json holds."""
    workdir = Path(workdir)
    path, is_pipeline = model_to_score(Path(config.evaluate.model) if config.evaluate.model else workdir)
    if is_pipeline:
        result = evaluate_pipeline(load_stable_diffusion(path), config.evaluate, config.data)
    else:
        model, params = load_model(path)
        if jax.tree_util.tree_map(np.shape, params) != jax.tree_util.tree_map(np.shape, param_shapes(model)):
            raise ValueError(f"{path} holds stacked DeMe replicas, not one model: run `deme merge` first.")
        result = evaluate_model(model, params, make_schedule(**config.diffusion), config.evaluate, config.data)
    result["model"] = str(path)
    if jax.process_index() > 0:  # every process computed the same; one writes
        result.pop("samples")
        return result
    out = workdir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    save_image_grid(jnp.asarray(result.pop("samples")[:64], jnp.float32) / 127.5 - 1, out / "samples.png")
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    writer = metric_writers.create_default_writer(out)
    writer.write_scalars(0, {f"eval/{k}": v["mean"] for k, v in result["summary"].items()})
    writer.flush()
    logging.info("%s: %s -> %s", path, result["summary"], out / "results.json")
    return result
