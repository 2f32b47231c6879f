"""``finetune(config, workdir)``: DeMe's decoupled finetuning of N replicas, stacked or one at a time.

Replica i starts from the pretrained weights (with identity channel
projections when ``config.deme.channel_projection``), draws its batches from
its own data stream and its noise from its own rng, and trains on interval i
with the consistency loss against the frozen pretrained model.

``mode="stacked"`` trains all replicas in one jitted step, the replica axis
sharded over a ``replica`` mesh axis; ``mode="sequential"`` trains them one
after another in ``workdir/replica_<i>`` (for models too big to stack). Both
compute the same replicas from the same config.

A Stable Diffusion directory as config.deme.pretrained finetunes its UNet on
latents and text states from the latent caches (``deme_jax.deme.data``), with
the pipeline's noise schedule; the teacher sees the student's text states.

``partition="conflict"`` measures the pretrained model's gradient similarity
between fine timestep bins once, chooses the intervals from it and keeps both
in ``workdir/partition.json``; the run's config then carries the boundaries,
so merging, evaluation and analysis use them as they use any partition.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from deme_jax.data import training_batches
from deme_jax.deme.data import batch_spec, heldout_batch, is_text_to_image, replica_streams
from deme_jax.deme.ensemble import TimestepEnsemble
from deme_jax.deme.intervals import PARTITION_RULES, conflict_partition, make_partition, within_similarity
from deme_jax.deme.objective import uncertainty_reduction
from deme_jax.deme.replicas import (
    init_replicas,
    interval_tasks,
    make_replica_step,
    map_over_replicas,
    replica_shardings,
    task_slice,
    with_identity_projections,
)
from deme_jax.diffusion import ddim_sample, make_plan, make_schedule, min_snr_weight, p2_weight
from deme_jax.diffusion.timesteps import uniform_partition
from deme_jax.interop import load_model, load_run, load_stable_diffusion
from deme_jax.interop.scheduler import diffusers_schedule_fields
from deme_jax.models import LoRAModel, init_lora, lora_targets, model_fields
from deme_jax.randomness import stream_key, stream_seed
from deme_jax.text2image.latent_cache import weights_fingerprint
from deme_jax.text2image.pipeline import images_from_states
from deme_jax.train.loop import Job, report_boundaries, run_training
from deme_jax.train.sharding import make_mesh, replicated, state_shardings
from deme_jax.train.state import create_train_state, make_optimizer
from deme_jax.train.step import LOSS_PARAMS, make_heldout_loss, microbatch_size, model_params
from deme_jax.train.validate import ConfigError, require, validate_config
from deme_jax.train.workdir import open_run

MODES = ("stacked", "sequential")
WEIGHTINGS = ("none", "min_snr", "p2", "uncertainty")
PARTITION_FILE = "partition.json"


def validate_deme_config(config) -> None:
    deme = config.deme
    require(bool(deme.pretrained), "config.deme.pretrained is empty: give the pretrained model (an orbax "
                                   "checkpoint, a diffusers directory or a training workdir).")
    require(Path(deme.pretrained).exists(), f"config.deme.pretrained={deme.pretrained!r} does not exist.")
    require(deme.mode in MODES, f"config.deme.mode={deme.mode!r}: use one of {list(MODES)}.")
    require(deme.weighting in WEIGHTINGS, f"config.deme.weighting={deme.weighting!r}: use one of {list(WEIGHTINGS)}.")
    require(deme.partition in PARTITION_RULES, f"config.deme.partition={deme.partition!r}: use one of "
                                               f"{list(PARTITION_RULES)}.")
    require(isinstance(deme.num_replicas, int) and deme.num_replicas >= 1,
            f"config.deme.num_replicas={deme.num_replicas!r} must be an int >= 1.")
    require(0.0 <= deme.global_prob <= 1.0, f"config.deme.global_prob={deme.global_prob} must lie in [0, 1].")
    require(deme.weighting != "uncertainty" or deme.uncertainty_tasks >= 1,
            f"config.deme.uncertainty_tasks={deme.uncertainty_tasks} must be >= 1.")
    require(deme.consistency_weight >= 0, f"config.deme.consistency_weight={deme.consistency_weight} must be >= 0.")
    if deme.partition == "conflict":
        T = config.diffusion.num_train_timesteps
        require(isinstance(deme.conflict_bins, int) and deme.num_replicas <= deme.conflict_bins <= T,
                f"config.deme.conflict_bins={deme.conflict_bins!r} with num_replicas={deme.num_replicas}: the "
                f"intervals are unions of whole bins, so give between N={deme.num_replicas} and T={T} bins.")
    require(not (deme.mode == "stacked" and config.mesh.fsdp),
            "config.mesh.fsdp is for one model at a time: use config.deme.mode='sequential' with it.")


def partition_of(config, schedule) -> np.ndarray:
    deme = config.deme
    try:
        return make_partition(schedule.num_train_timesteps, deme.num_replicas, deme.partition, deme.boundaries,
                              np.asarray(schedule.alphas_cumprod))
    except ValueError as err:
        raise ConfigError(f"config.deme (num_replicas={deme.num_replicas}, partition={deme.partition!r}, "
                          f"boundaries={deme.boundaries}): {err}") from err


def with_conflict_partition(config, workdir, model, params, schedule, interval_similarity):
    """``config`` with ``deme.boundaries`` the conflict partition: read from ``workdir/partition.json`` when a
    run there chose it, else chosen from ``interval_similarity(model, params, schedule, batches, bins, rng)`` (the
    cosine matrix of the bins' gradients, ``deme_jax.analysis.gradient_conflict``) and written there."""
    path, deme, settings = Path(workdir) / PARTITION_FILE, config.deme, config.analyze
    if path.is_file():
        record = json.loads(path.read_text())
        K, N = len(record["bins"]) - 1, len(record["boundaries"]) - 1
        require((K, N) == (deme.conflict_bins, deme.num_replicas),
                f"{path} holds {N} intervals of {K} bins, but config.deme has num_replicas={deme.num_replicas} and "
                f"conflict_bins={deme.conflict_bins}: finetune in a new workdir, or keep the run's settings.")
    else:
        require(interval_similarity is not None,
                "config.deme.partition='conflict' needs the pretrained model's gradient similarity: run `deme "
                "finetune`, or pass deme_jax.analysis.gradient_conflict as interval_similarity.")
        bins = uniform_partition(schedule.num_train_timesteps, deme.conflict_bins)
        batches = training_batches(config.data, settings.num_batches, settings.num_images,
                                   stream_seed(settings.seed, "gradient_conflict"))
        logging.info("conflict partition: gradient similarity of the pretrained model over %d bins", len(bins) - 1)
        similarity = np.asarray(interval_similarity(model, params, schedule, batches, bins,
                                                    stream_key(settings.seed, "gradient_conflict")))
        boundaries = conflict_partition(similarity, bins, deme.num_replicas)
        record = {"bins": bins.tolist(), "similarity": similarity.tolist(), "boundaries": boundaries.tolist(),
                  "within_similarity": within_similarity(similarity, np.searchsorted(bins, boundaries)),
                  "within_similarity_equal_bins": within_similarity(
                      similarity, uniform_partition(deme.conflict_bins, deme.num_replicas))}
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2) + "\n")
    logging.info("conflict partition %s (within-interval similarity %.4f; equal bin counts %.4f)",
                 record["boundaries"], record["within_similarity"], record["within_similarity_equal_bins"])
    config.deme.boundaries = tuple(record["boundaries"])
    return config


def timestep_weight(config, schedule):
    deme = config.deme
    if deme.weighting == "min_snr":
        return functools.partial(min_snr_weight, schedule, gamma=deme.min_snr_gamma)
    if deme.weighting == "p2":
        return functools.partial(p2_weight, schedule, gamma=deme.p2_gamma, k=deme.p2_k)
    return None


def load_pretrained(config, pipeline=None):
    """``(teacher, teacher_params, student, student_params)``: the student adds identity projections if asked.

    ``pipeline``: the Stable Diffusion pipeline of config.deme.pretrained, whose UNet is the model. Both run in
    config.deme.dtype, rematerialised per block with config.deme.remat.
    """
    if pipeline is None:
        teacher, params = load_model(config.deme.pretrained)
    else:
        teacher, params = pipeline.unet, pipeline.params["unet"]
    if teacher.channel_projection:
        raise ConfigError(f"config.deme.pretrained={config.deme.pretrained!r} already has channel projections: "
                          "start from the model before DeMe (a merged model cannot be the frozen teacher).")
    data = config.data
    if pipeline is None:
        require(data.image_size == teacher.sample_size and data.channels == teacher.in_channels,
                f"config.data (image_size={data.image_size}, channels={data.channels}) does not fit the pretrained "
                f"model ({teacher.sample_size}x{teacher.sample_size}, {teacher.in_channels} channels).")
    else:
        factor = pipeline.vae_scale_factor
        require(data.image_size % factor == 0,
                f"config.data.image_size={data.image_size} is not a multiple of {factor}, the VAE's downsampling "
                "factor of config.deme.pretrained.")
    dtype, remat = config.deme.get("dtype", "float32"), config.deme.get("remat", False)  # older runs lack them
    require(dtype in ("float32", "bfloat16"),
            f"config.deme.dtype={dtype!r}: use 'float32' or 'bfloat16' (parameters stay float32).")
    require(not remat or hasattr(teacher, "remat"),
            f"config.deme.remat=True: {type(teacher).__name__} has no rematerialisation option; set it to False.")
    how = {"dtype": jnp.dtype(dtype), **({"remat": True} if remat else {})}
    teacher = teacher.clone(**how)
    if config.deme.channel_projection:
        return (teacher, params, *with_identity_projections(teacher, params))
    return teacher, params, teacher, params


def load_pretrained_pipeline(config):
    """The Stable Diffusion pipeline of config.deme.pretrained, or None for a pixel-space model."""
    return load_stable_diffusion(config.deme.pretrained) if is_text_to_image(config) else None


def with_pipeline_schedule(config, pipeline):
    """``config`` with the pretrained pipeline's noise schedule as ``config.diffusion``: a text-to-image model is
    finetuned, merged and scored under the schedule it was trained with."""
    if pipeline is None:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.diffusion = ml_collections.ConfigDict(diffusers_schedule_fields(config.deme.pretrained))
    return config


LORA_TARGETS = ("attention", "convolution")


def lora_scale(deme) -> float:
    return (deme.lora_alpha or deme.lora_rank) / deme.lora_rank


def lora_student(config, student, student_params, teacher_params):
    """``(student, initial parameters)`` of the replicas: with config.deme.lora a ``LoRAModel`` of the student
    whose trainable tree is fresh adapters on config.deme.lora_targets of the pretrained weights (stream
    ``lora``) and, trained in full, the student's own new leaves (DeMe's channel projections)."""
    deme = config.deme
    if not deme.get("lora", False):
        return student, student_params
    require(isinstance(deme.lora_rank, int) and not isinstance(deme.lora_rank, bool) and deme.lora_rank >= 1,
            f"config.deme.lora_rank={deme.lora_rank!r}: the LoRA rank must be a positive integer (4 to 64 is usual).")
    targets = tuple(deme.lora_targets)
    require(bool(targets) and set(targets) <= set(LORA_TARGETS),
            f"config.deme.lora_targets={targets}: choose from {list(LORA_TARGETS)} (channel projections are "
            "trained in full).")
    require(deme.lora_alpha is None or deme.lora_alpha > 0, f"config.deme.lora_alpha={deme.lora_alpha} must be > 0.")
    try:
        adapters = init_lora(teacher_params, deme.lora_rank, stream_key(config.seed, "lora"),
                             lora_targets(teacher_params, targets))
    except ValueError as err:
        raise ConfigError(f"config.deme.lora_rank / lora_targets: {err}") from err
    pretrained = traverse_util.flatten_dict(teacher_params)
    full = {p: x for p, x in traverse_util.flatten_dict(model_params(student_params)).items() if p not in pretrained}
    return LoRAModel(student, lora_scale(deme)), {"lora": adapters, "full": traverse_util.unflatten_dict(full)}


def with_model(config, model):
    """A copy of ``config`` whose ``model`` block describes ``model`` (the run's config.json then rebuilds it)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model = ml_collections.ConfigDict(model_fields(model))
    return config


def replica_rngs(seed: int, num_replicas: int) -> jax.Array:
    """Replica i's ``train`` stream: its timesteps, noise and dropout."""
    return jnp.stack([stream_key(seed, "train", i) for i in range(num_replicas)])


def array_from_rows(make_rows, spec, sharding):
    """A global batch (an array or a pytree) laid out as ``spec`` whose devices each take their slice of
    ``make_rows()`` (computed once)."""
    rows = functools.cache(make_rows)
    leaf = lambda path, s: jax.make_array_from_callback(
        s.shape, sharding, lambda index: leaf_of(rows(), path)[index])
    return jax.tree_util.tree_map_with_path(leaf, spec)


def leaf_of(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def sampler_of(config, parts, pipeline):
    """``sample(ema_params, noise) -> images`` for the sample grids logged during training: DDIM from the
    replicas' model (a pixel model, or a UNet that gets guided text states: the held-out captions' and the
    empty caption's, decoded by the pipeline's VAE)."""
    schedule, steps = parts["schedule"], config.sample.ddim_steps
    if pipeline is None:
        return lambda params, noise: ddim_sample(parts["sampler"], model_params(params), schedule, noise, steps)
    n = config.sample.num_images
    text = heldout_batch(config, parts["workdir"], n, parts["fingerprint"], "config.sample.num_images")["text"]
    empty = np.broadcast_to(parts["streams"][0].source.empty_text, text.shape)
    guided = config.sample.guidance_scale > 1.0
    states = jnp.asarray(np.concatenate([empty, text]) if guided else text)
    plan = make_plan(schedule, "ddim", steps)
    sample = jax.jit(images_from_states, static_argnums=(0, 1, 2))
    return lambda params, noise: sample(
        parts["sampler"], pipeline.vae, guided, {"unet": model_params(params), "vae": pipeline.params["vae"]},
        schedule, plan, states, noise, jnp.float32(config.sample.guidance_scale))


def replica_job(config, mesh, parts: dict, stacked: bool, pipeline=None) -> Job:
    """The training job of the replicas in ``parts`` (one for the sequential mode, all when stacked).

    ``parts``: the step, the student's initial parameters, the optimizer,
    the replicas' ``rngs``, ``streams`` and ``tasks`` (one replica's when not
    stacked), the held-out loss, the held-out batch (``heldout``, made once
    per run), the caches' ``fingerprint`` (None for a pixel model) and the
    model that samples (the timestep ensemble of stacked replicas).
    """
    streams, spec = parts["streams"], batch_spec(config, parts["streams"][0])
    if stacked:
        state_sharding, data_sharding, task_shardings = replica_shardings(mesh)
        shardings = lambda abstract: jax.tree_util.tree_map(lambda _: state_sharding, abstract)
        spec = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct((len(streams), *s.shape), s.dtype), spec)
        rows = lambda k: jax.tree_util.tree_map(lambda *x: np.stack(x), *(s.batch(k) for s in streams))
        init = lambda: init_replicas(parts["params"], parts["optimizer"], parts["rngs"])
    else:  # one replica: data parallel, or with config.mesh.fsdp its state and the teacher split over `data`
        data_sharding = NamedSharding(mesh, P("data"))
        shardings = lambda abstract: state_shardings(mesh, abstract, config.mesh.fsdp)
        task_shardings = {"low": replicated(mesh), "high": replicated(mesh),
                          "teacher": state_shardings(mesh, parts["tasks"]["teacher"], config.mesh.fsdp)}
        rows = streams[0].batch
        init = lambda: create_train_state(parts["params"], parts["optimizer"], parts["rngs"])
    sample_shape = None if pipeline is None else spec["latents"].shape[-3:]
    return Job(
        init_state=init,
        step=map_over_replicas(parts["step"], mesh) if stacked else parts["step"],
        batch=lambda k: array_from_rows(lambda: rows(k), spec, data_sharding),
        batch_spec=jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=data_sharding),
                                          spec),
        state_shardings=shardings,
        mesh=mesh,
        heldout_loss=parts["heldout_loss"],
        sample=sampler_of(config, parts, pipeline) if config.train.sample_every else None,
        step_args=(jax.device_put(parts["tasks"], task_shardings),),
        num_replicas=len(streams) if stacked else None,
        heldout=parts["heldout"],
        sample_shape=sample_shape,
    )


def finetune(config, workdir: str | Path, interval_similarity=None):
    """Finetunes ``config.deme.num_replicas`` replicas in ``workdir`` (resuming); returns their final state(s).

    ``interval_similarity``: how partition="conflict" measures the gradient
    similarity of timestep bins (``deme_jax.analysis.gradient_conflict``).
    """
    validate_deme_config(config)
    pipeline = load_pretrained_pipeline(config)
    require(pipeline is None or config.deme.partition != "conflict",
            "config.deme.partition='conflict' measures gradients on pixel images; for Stable Diffusion use "
            "'uniform', 'log_snr' or 'explicit'.")
    config = with_pipeline_schedule(config, pipeline)
    teacher, teacher_params, student, student_params = load_pretrained(config, pipeline)
    config = with_model(config, student)
    N, stacked = config.deme.num_replicas, config.deme.mode == "stacked"
    mesh = make_mesh(config.mesh.shape if stacked else {"data": config.mesh.shape["data"]}, N)
    validate_config(config, workdir, mesh.shape["data"])
    schedule = make_schedule(**config.diffusion)
    if config.deme.partition == "conflict" and config.deme.boundaries is None:
        config = with_conflict_partition(config, workdir, teacher, teacher_params, schedule, interval_similarity)
    partition = partition_of(config, schedule)
    logging.info("DeMe: %d replica(s) on intervals %s, mode %s.", N,
                 [f"[{a}, {b})" for a, b in zip(partition[:-1], partition[1:])], config.deme.mode)
    reduce_loss = None
    if config.deme.weighting == "uncertainty":
        reduce_loss = uncertainty_reduction(schedule.num_train_timesteps, config.deme.uncertainty_tasks)
        student_params = {**student_params, LOSS_PARAMS: {
            "log_variances": jnp.zeros((config.deme.uncertainty_tasks,), jnp.float32)}}
    optimizer, boundaries = make_optimizer(config.optim), report_boundaries(config)
    fingerprint = None if pipeline is None else weights_fingerprint(pipeline)  # of the caches it reads
    trained, trained_params = lora_student(config, student, student_params, teacher_params)
    # evaluation and sampling read the frozen base of LoRA replicas from the model itself
    evaluated = LoRAModel(student, trained.scale, teacher_params) if config.deme.get("lora") else student
    if reduce_loss is not None:
        trained_params = {**trained_params, LOSS_PARAMS: student_params[LOSS_PARAMS]}
    parts = dict(
        step=make_replica_step(trained, teacher, schedule, optimizer, config.ema, boundaries,
                               config.deme.global_prob, config.deme.consistency_weight,
                               timestep_weight(config, schedule), reduce_loss, config.train.grad_accum_steps,
                               lora=bool(config.deme.get("lora"))),
        params=trained_params, optimizer=optimizer, schedule=schedule,
        rngs=replica_rngs(config.seed, N), streams=replica_streams(config, workdir, fingerprint), workdir=workdir,
        fingerprint=fingerprint,
        heldout=functools.cache(lambda: heldout_batch(config, workdir, config.eval.num_images, fingerprint)),
        tasks=interval_tasks(partition, teacher_params),
        heldout_loss=make_heldout_loss(evaluated, schedule, boundaries, microbatch_size(config.train)),
        sampler=TimestepEnsemble(evaluated, tuple(int(b) for b in partition)),
    )
    if stacked:
        return run_training(config, workdir, replica_job(config, mesh, parts, stacked=True, pipeline=pipeline))

    states = []
    with open_run(workdir, json.loads(config.to_json())):  # the run's config, for `deme merge`
        for i in range(N):  # each replica_<i> holds its own run
            one = {**parts, "rngs": parts["rngs"][i], "streams": parts["streams"][i:i + 1],
                   "tasks": task_slice(parts["tasks"], i), "sampler": evaluated}
            logging.info("Replica %d of %d, interval [%d, %d).", i + 1, N, partition[i], partition[i + 1])
            job = replica_job(config, mesh, one, stacked=False, pipeline=pipeline)
            states.append(run_training(config, Path(workdir) / f"replica_{i}", job))
    return states


def load_replicas(workdir: str | Path):
    """``(model, stacked_ema_params, partition, config)`` of a finetuning workdir, stacked or sequential."""
    model, params, config, steps = load_run(workdir)
    if "deme" not in config:
        raise ValueError(f"{workdir} holds a pretraining run, not DeMe replicas (its config has no `deme` block).")
    if any(s != config.train.num_steps for s in steps):
        logging.warning("%s: replicas are at steps %s of %d; merging unfinished replicas.", workdir, steps,
                        config.train.num_steps)
    return model, params, partition_of(config, make_schedule(**config.diffusion)), config
