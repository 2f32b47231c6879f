"""Checks a training config before anything is compiled, naming the field at fault."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax

from deme_jax.models import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES
from deme_jax.models.registry import MODEL_CLASSES, field_names


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what would."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_model(model) -> None:
    class_name = model.get("class_name", "UNet2D")
    require(class_name in MODEL_CLASSES, f"config.model.class_name={class_name!r}: use one of {sorted(MODEL_CLASSES)}.")
    fields = set(field_names(MODEL_CLASSES[class_name])) | {"class_name"}
    unknown = sorted(set(model) - fields)
    require(not unknown, f"config.model has unknown fields {unknown}; {class_name} takes {sorted(fields)}.")
    require(model.get("dtype", "float32") in ("float32", "bfloat16"),
            f"config.model.dtype={model.get('dtype')!r}: use 'float32' or 'bfloat16'.")
    if class_name != "UNet2D":  # loaded from a checkpoint (Stable Diffusion's UNet), which its loader checked
        return
    channels, groups = list(model.block_out_channels), model.norm_num_groups
    levels = len(channels)
    require(len(model.down_block_types) == levels and len(model.up_block_types) == levels,
            f"config.model.down_block_types and up_block_types need one entry per block_out_channels ({levels}).")
    for field, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        bad = [b for b in model[field] if b not in allowed]
        require(not bad, f"config.model.{field} has {bad}; supported: {list(allowed)}.")
    bad = [c for c in channels if c % groups]
    require(not bad, f"config.model.block_out_channels {bad} are not divisible by norm_num_groups={groups}.")
    head = model.get("attention_head_dim")
    bad = [c for c in channels if head and c % head]
    require(not bad, f"config.model.block_out_channels {bad} are not divisible by attention_head_dim={head}.")
    size = model.sample_size
    require(size and size % 2 ** (levels - 1) == 0,
            f"config.model.sample_size={size} must be divisible by 2**{levels - 1} for {levels} levels.")


def validate_config(config, workdir, data_devices: int | None = None) -> None:
    """``data_devices``: how many devices split each batch (default all of them)."""
    train, optim, ema = config.train, config.optim, config.ema
    require(train.num_steps > 0, f"config.train.num_steps={train.num_steps} must be > 0.")
    require(train.batch_size > 0, f"config.train.batch_size={train.batch_size} must be > 0.")
    n_dev = jax.device_count() if data_devices is None else data_devices
    n_proc = jax.process_count()
    require(train.batch_size % n_dev == 0,
            f"config.train.batch_size={train.batch_size} is not divisible by the {n_dev} devices that split a "
            f"batch; use a multiple of {n_dev}.")
    k = train.grad_accum_steps
    require(isinstance(k, int) and k >= 1, f"config.train.grad_accum_steps={k!r} must be an int >= 1.")
    require(train.batch_size % (k * n_dev) == 0,
            f"config.train.batch_size={train.batch_size} does not split into config.train.grad_accum_steps={k} "
            f"equal microbatches over the {n_dev} devices that split a batch: use a batch_size that is a multiple "
            f"of {k} x {n_dev} = {k * n_dev}, or a grad_accum_steps that divides batch_size / {n_dev}.")
    require(train.batch_size % n_proc == 0,
            f"config.train.batch_size={train.batch_size} is not divisible by the {n_proc} processes.")
    for field in ("log_every", "checkpoint_every", "keep_checkpoints"):
        require(train[field] > 0, f"config.train.{field}={train[field]} must be > 0.")
    for field in ("eval_every", "sample_every"):
        require(train[field] >= 0, f"config.train.{field}={train[field]} must be >= 0 (0: never).")
    require(train.loss_intervals > 0, f"config.train.loss_intervals={train.loss_intervals} must be > 0.")
    require(optim.lr > 0, f"config.optim.lr={optim.lr} must be > 0.")
    require(optim.schedule in ("constant", "cosine"), f"config.optim.schedule={optim.schedule!r}: use "
                                                      "'constant' or 'cosine'.")
    require(optim.warmup_steps >= 0, f"config.optim.warmup_steps={optim.warmup_steps} must be >= 0.")
    if optim.schedule == "cosine":
        require(optim.decay_steps > optim.warmup_steps,
                f"config.optim.decay_steps={optim.decay_steps} must exceed warmup_steps={optim.warmup_steps}: the "
                "cosine decays from the end of the warm-up to decay_steps.")
        require(0 <= optim.final_lr_fraction <= 1,
                f"config.optim.final_lr_fraction={optim.final_lr_fraction} must be in [0, 1].")
    require(0 <= optim.b1 < 1 and 0 <= optim.b2 < 1, f"config.optim.b1={optim.b1}, b2={optim.b2} must be in [0, 1).")
    require(optim.weight_decay >= 0, f"config.optim.weight_decay={optim.weight_decay} must be >= 0.")
    require(optim.grad_clip >= 0, f"config.optim.grad_clip={optim.grad_clip} must be >= 0 (0 turns it off).")
    require(0 <= ema.max_decay < 1, f"config.ema.max_decay={ema.max_decay} must be in [0, 1).")
    require(ema.inv_gamma > 0 and ema.power > 0, "config.ema.inv_gamma and config.ema.power must be > 0.")
    require(config.diffusion.num_train_timesteps >= train.loss_intervals,
            f"config.diffusion.num_train_timesteps={config.diffusion.num_train_timesteps} is smaller than "
            f"config.train.loss_intervals={train.loss_intervals}.")
    if config.model.get("class_name", "UNet2D") == "UNet2D":  # a text-to-image UNet sees latents, not config.data
        require(config.data.image_size == config.model.sample_size,
                f"config.data.image_size={config.data.image_size} differs from config.model.sample_size="
                f"{config.model.sample_size}; set both to the image size the model is trained on.")
        require(config.data.channels == config.model.in_channels == config.model.out_channels,
                f"config.data.channels={config.data.channels} must equal config.model.in_channels and "
                "out_channels.")
    axes = list(config.mesh.shape)
    require(set(axes) <= {"replica", "data"} and "data" in axes,
            f"config.mesh.shape has the axes {axes}: give `data` (and `replica` for stacked DeMe replicas).")
    validate_model(config.model)
    check_workdir(workdir)


def check_workdir(workdir) -> None:
    """A writable local or mounted directory: the workdir lock and checkpoint checksums need a POSIX file system."""
    require("://" not in str(workdir),
            f"--workdir={workdir} is a URL; the workdir must be a directory of a mounted file system (on a pod, one "
            "that every worker mounts, such as Filestore or another NFS share).")
    path = Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"--workdir={workdir} is not writable ({err.strerror}); choose a directory you can "
                          "write to.") from err
    require(os.access(path, os.W_OK), f"--workdir={workdir} is not writable.")
