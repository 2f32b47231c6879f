"""One loader for "a path that holds a model": a diffusers or transformers model directory (a pipeline
directory gives its UNet), an orbax export of ours, a training workdir or a DeMe finetuning workdir (stacked
or sequential).

Workdirs give their EMA parameters, which is what a run is evaluated and
exported with; DeMe workdirs give them stacked (a leading replica axis).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from deme_jax.diffusion import NoiseSchedule, make_schedule
from deme_jax.interop.checkpoint import is_orbax_model, load_orbax_model
from deme_jax.interop.diffusers import load_diffusers_model
from deme_jax.interop.scheduler import load_diffusers_scheduler
from deme_jax.models import build_model
from deme_jax.train.checkpoints import Checkpoints, DamagedCheckpointError
from deme_jax.train.step import model_params


def run_config(path: str | Path) -> ml_collections.ConfigDict | None:
    """The config a training or finetuning workdir was run with, or None for any other path (a diffusers model
    directory has a config.json too: the model's)."""
    path = Path(path) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return ml_collections.ConfigDict(config) if "train" in config and "diffusion" in config else None


def is_training_workdir(path: str | Path) -> bool:
    return run_config(path) is not None and (Path(path) / "checkpoints").is_dir()


def replica_dirs(workdir: Path, config) -> list[Path] | None:
    """``replica_<i>`` of a sequential DeMe workdir (each a training workdir), else None."""
    if "deme" in config and config.deme.mode == "sequential":
        return [workdir / f"replica_{i}" for i in range(config.deme.num_replicas)]
    return None


def load_checkpoint(workdir: Path, config):
    """``(model, ema_params, step)`` from the latest checkpoint of a training workdir run with ``config``.

    The state is read as saved, onto this process's first device, whatever
    mesh wrote it; the loss's own parameters (ANT-UW) are left out.
    """
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"{workdir} holds no checkpoints yet.")
    checkpoints = Checkpoints(workdir, keep=config.train.keep_checkpoints, asynchronous=False, read_only=True)
    try:
        step = checkpoints.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir / 'checkpoints'} holds no finished checkpoint yet.")
        try:
            checkpoints.verify(step)
        except DamagedCheckpointError as err:
            raise DamagedCheckpointError(
                f"The checkpoint of step {step} in {workdir / 'checkpoints'} is damaged ({err}). Resuming the run "
                "moves it aside and continues from the one before it; or restore it from a copy.") from None
        state = checkpoints.restore_as_saved(step)
    finally:
        checkpoints.close()
    return build_model(config.model), model_params(state["ema_params"]), step


def load_run(workdir: str | Path):
    """``(model, ema_params, config, steps)`` of a training or DeMe workdir; ``steps`` has one entry per replica
    (one for a pretraining run)."""
    workdir = Path(workdir)
    config = run_config(workdir)
    if config is None:
        raise FileNotFoundError(f"{workdir} is not a run's workdir (no config.json); run `deme pretrain` or "
                                "`deme finetune` there first.")
    dirs = replica_dirs(workdir, config)
    if dirs is None:
        model, params, step = load_checkpoint(workdir, config)
        return model, params, config, [step] * config.get("deme", {}).get("num_replicas", 1)
    for i, replica_dir in enumerate(dirs):
        if not is_training_workdir(replica_dir):
            raise FileNotFoundError(f"{replica_dir} holds no checkpoint: replica {i} has not been trained yet.")
    loaded = [load_checkpoint(d, config) for d in dirs]
    params = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *(p for _, p, _ in loaded))
    return loaded[0][0], params, config, [s for _, _, s in loaded]


def load_model(path: str | Path):
    """``(model, params)`` from any path that holds a model (see the module docstring)."""
    if run_config(path) is not None:
        model, params, _, steps = load_run(path)
        logging.info("%s: the EMA parameters of step %s", path, steps[0] if len(set(steps)) == 1 else steps)
        return model, params
    if is_orbax_model(path):
        return load_orbax_model(path)
    path = Path(path)
    if (path / "config.json").is_file() or path.is_file():
        return load_diffusers_model(path)
    if (path / "unet" / "config.json").is_file():  # a pipeline directory gives its UNet
        return load_diffusers_model(path / "unet")
    raise FileNotFoundError(f"No model at {path}: expected a diffusers or transformers model directory "
                            "(config.json and its safetensors weights), a pipeline directory (unet/config.json), "
                            "an orbax export of ours (params/ and model_config/) or a training workdir.")


def load_schedule(path: str | Path | None) -> NoiseSchedule:
    """A workdir's schedule, a diffusers scheduler's, else DDPM's linear 1e-4..0.02 over 1000 steps."""
    config = run_config(path) if path else None
    if config is not None:
        return make_schedule(**config.diffusion)
    if path and any((Path(path) / p).is_file() for p in ("scheduler_config.json", "scheduler/scheduler_config.json")):
        return load_diffusers_scheduler(path)
    return make_schedule()
