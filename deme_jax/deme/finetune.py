"""``finetune(config, workdir)``: DeMe's decoupled finetuning of N replicas, stacked or one at a time.

Replica i starts from the pretrained weights (with identity channel
projections when ``config.deme.channel_projection``), draws its batches from
its own data stream and its noise from its own rng, and trains on interval i
with the consistency loss against the frozen pretrained model.

``mode="stacked"`` trains all replicas in one jitted step, the replica axis
sharded over a ``replica`` mesh axis; ``mode="sequential"`` trains them one
after another in ``workdir/replica_<i>`` (for models too big to stack). Both
compute the same replicas from the same config.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from deme_jax.data import make_source
from deme_jax.data.stream import BatchStream
from deme_jax.deme.ensemble import TimestepEnsemble
from deme_jax.deme.intervals import PARTITION_RULES, make_partition
from deme_jax.deme.objective import uncertainty_reduction
from deme_jax.deme.replicas import make_replica_step, map_over_replicas, with_identity_projections
from deme_jax.diffusion import ddim_sample, min_snr_weight, p2_weight
from deme_jax.train.checkpoints import is_training_workdir, load_model, load_trained_unet
from deme_jax.train.loop import Job, batch_shape, build_schedule, run_training
from deme_jax.train.sharding import batch_sharding, make_mesh, replicated
from deme_jax.train.state import create_train_state, make_optimizer
from deme_jax.train.step import LOSS_PARAMS, make_heldout_loss, model_params
from deme_jax.train.validate import ConfigError, require, validate_config

MODES = ("stacked", "sequential")
WEIGHTINGS = ("none", "min_snr", "p2", "uncertainty")


def default_deme_config() -> ml_collections.ConfigDict:
    """The ``config.deme`` fields; the defaults are the reference's LSUN-Church recipe."""
    return ml_collections.ConfigDict(dict(
        pretrained="",  # orbax model checkpoint, diffusers directory or training workdir (its EMA weights)
        num_replicas=4,  # N; 1 is plain finetuning
        partition="uniform",  # "uniform", "explicit" (boundaries) or "log_snr" (equal ranges of log-SNR)
        boundaries=ml_collections.config_dict.placeholder(tuple),  # [0, b1, ..., T] for "explicit"
        global_prob=0.3,  # p: a batch samples all of [0, T) with this probability
        consistency_weight=1.0,  # lambda of mse(student, frozen pretrained); 0 drops the teacher
        channel_projection=True,  # identity-initialised 1x1 projections after every block
        mode="stacked",  # "stacked" (one jitted step for all replicas) or "sequential"
        weighting="none",  # loss re-weighting baselines: "none", "min_snr", "p2" or "uncertainty" (ANT-UW)
        min_snr_gamma=5.0,
        p2_gamma=1.0,
        p2_k=1.0,
        uncertainty_tasks=4,  # ANT-UW: equal timestep intervals, each with a learnt log-variance
    ))


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


def timestep_weight(config, schedule):
    deme = config.deme
    if deme.weighting == "min_snr":
        return functools.partial(min_snr_weight, schedule, gamma=deme.min_snr_gamma)
    if deme.weighting == "p2":
        return functools.partial(p2_weight, schedule, gamma=deme.p2_gamma, k=deme.p2_k)
    return None


def load_pretrained(config):
    """``(teacher, teacher_params, student, student_params)``: the student adds identity projections if asked."""
    teacher, params = load_model(config.deme.pretrained)
    if teacher.channel_projection:
        raise ConfigError(f"config.deme.pretrained={config.deme.pretrained!r} already has channel projections: "
                          "start from the model before DeMe (a merged model cannot be the frozen teacher).")
    data = config.data
    require(data.image_size == teacher.sample_size and data.channels == teacher.in_channels,
            f"config.data (image_size={data.image_size}, channels={data.channels}) does not fit the pretrained "
            f"model ({teacher.sample_size}x{teacher.sample_size}, {teacher.in_channels} channels).")
    if config.deme.channel_projection:
        return (teacher, params, *with_identity_projections(teacher, params))
    return teacher, params, teacher, params


def with_model(config, model):
    """A copy of ``config`` whose ``model`` block describes ``model`` (the run's config.json then rebuilds it)."""
    fields = {f: getattr(model, f) for f in model.__dataclass_fields__ if f not in ("parent", "name")}
    fields["dtype"] = jnp.dtype(fields["dtype"]).name
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model = ml_collections.ConfigDict(fields)
    return config


def replica_rngs(seed: int, num_replicas: int) -> jax.Array:
    return jax.random.split(jax.random.fold_in(jax.random.key(seed), 7), num_replicas)


def replica_streams(config) -> list[BatchStream]:
    """Replica i's batches: its own order of the training set, the same in either mode and on any process."""
    source = make_source(config.data)
    return [BatchStream(source, config.train.batch_size, seed=config.seed * 1_000 + i,
                        random_flip=config.data.random_flip) for i in range(config.deme.num_replicas)]


def array_from_rows(make_rows, shape, sharding) -> jax.Array:
    """A global array whose devices each take their slice of ``make_rows()`` (computed once)."""
    rows = functools.cache(make_rows)
    return jax.make_array_from_callback(shape, sharding, lambda index: rows()[index])


def replica_mesh(num_replicas: int):
    """(replica, data) axes: replicas spread over as many devices as divide both N and the device count."""
    n = jax.device_count()
    r = math.gcd(num_replicas, n)
    return jax.make_mesh((r, n // r), ("replica", "data"), axis_types=(AxisType.Auto,) * 2)


def finetune(config, workdir: str | Path):
    """Finetunes ``config.deme.num_replicas`` replicas in ``workdir`` (resuming); returns their final state(s)."""
    validate_deme_config(config)
    teacher, teacher_params, student, student_params = load_pretrained(config)
    config = with_model(config, student)
    N = config.deme.num_replicas
    stacked = config.deme.mode == "stacked"
    validate_config(config, workdir, replica_mesh(N).shape["data"] if stacked else None)
    schedule = build_schedule(config.diffusion)
    partition = partition_of(config, schedule)
    logging.info("DeMe: %d replica(s) on intervals %s, mode %s.", N,
                 [f"[{a}, {b})" for a, b in zip(partition[:-1], partition[1:])], config.deme.mode)
    optimizer = make_optimizer(config.optim)
    reduce_loss = None
    if config.deme.weighting == "uncertainty":
        reduce_loss = uncertainty_reduction(schedule.num_train_timesteps, config.deme.uncertainty_tasks)
        student_params = {**student_params, LOSS_PARAMS: {
            "log_variances": jnp.zeros((config.deme.uncertainty_tasks,), jnp.float32)}}
    step = make_replica_step(student, teacher, schedule, optimizer, config.ema, config.train.loss_intervals,
                             config.deme.global_prob, config.deme.consistency_weight,
                             timestep_weight(config, schedule), reduce_loss)
    rngs, streams = replica_rngs(config.seed, N), replica_streams(config)
    heldout = make_heldout_loss(student, schedule, config.train.loss_intervals)
    shape = batch_shape(config)
    low, high = np.asarray(partition[:-1], np.int32), np.asarray(partition[1:], np.int32)

    if stacked:
        mesh = replica_mesh(N)
        per_replica, data_sharding = NamedSharding(mesh, P("replica")), NamedSharding(mesh, P("replica", "data"))
        task = {"low": jax.device_put(low, per_replica), "high": jax.device_put(high, per_replica),
                "teacher": jax.device_put(teacher_params, replicated(mesh))}
        ensemble = TimestepEnsemble(student, tuple(int(b) for b in partition))
        job = Job(
            init_state=lambda: jax.vmap(lambda rng: create_train_state(student_params, optimizer, rng))(rngs),
            step=map_over_replicas(step, mesh),
            batch=lambda i: array_from_rows(lambda: np.stack([s.batch(i) for s in streams]), (N, *shape),
                                            data_sharding),
            batch_spec=jax.ShapeDtypeStruct((N, *shape), jnp.float32, sharding=data_sharding),
            state_shardings=lambda abstract: jax.tree_util.tree_map(lambda _: per_replica, abstract),
            mesh=mesh,
            heldout_loss=heldout,
            sample=lambda params, noise: ddim_sample(ensemble, model_params(params), schedule, noise,
                                                     config.sample.ddim_steps),
            step_args=(task,),
            num_replicas=N,
        )
        return run_training(config, workdir, job)

    if jax.process_index() == 0:  # the run's config, for `deme merge`; each replica_<i> holds its own run
        (Path(workdir) / "config.json").write_text(config.to_json(indent=2) + "\n")
    states = []
    mesh = make_mesh()
    data_sharding, repl = batch_sharding(mesh), replicated(mesh)
    for i, stream in enumerate(streams):
        task = jax.device_put({"low": low[i], "high": high[i], "teacher": teacher_params}, repl)
        job = Job(
            init_state=lambda rng=rngs[i]: create_train_state(student_params, optimizer, rng),
            step=step,
            batch=lambda k, stream=stream: array_from_rows(lambda: stream.batch(k), shape, data_sharding),
            batch_spec=jax.ShapeDtypeStruct(shape, jnp.float32, sharding=data_sharding),
            state_shardings=lambda abstract: jax.tree_util.tree_map(lambda _: repl, abstract),
            mesh=mesh,
            heldout_loss=heldout,
            sample=lambda params, noise: ddim_sample(student, model_params(params), schedule, noise,
                                                     config.sample.ddim_steps),
            step_args=(task,),
        )
        logging.info("Replica %d of %d, interval [%d, %d).", i + 1, N, low[i], high[i])
        states.append(run_training(config, Path(workdir) / f"replica_{i}", job))
    return states


def load_replicas(workdir: str | Path):
    """``(model, stacked_ema_params, partition, config)`` of a finetuning workdir, stacked or sequential."""
    import json

    workdir = Path(workdir)
    if not (workdir / "config.json").is_file():
        raise FileNotFoundError(f"{workdir} is not a finetuning workdir (no config.json); run `deme finetune` first.")
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    if "deme" not in config:
        raise ValueError(f"{workdir} holds a pretraining run, not DeMe replicas (its config has no `deme` block).")
    N = config.deme.num_replicas
    if config.deme.mode == "stacked":
        model, params, step = load_trained_unet(workdir)
        steps = [step] * N
    else:
        loaded = []
        for i in range(N):
            replica_dir = workdir / f"replica_{i}"
            if not is_training_workdir(replica_dir):
                raise FileNotFoundError(f"{replica_dir} holds no checkpoint: replica {i} has not been trained yet.")
            loaded.append(load_trained_unet(replica_dir))
        model = loaded[0][0]
        params = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *(p for _, p, _ in loaded))
        steps = [s for _, _, s in loaded]
    if any(s != config.train.num_steps for s in steps):
        logging.warning("%s: replicas are at steps %s of %d; merging unfinished replicas.", workdir, steps,
                        config.train.num_steps)
    return model, params, partition_of(config, build_schedule(config.diffusion)), config

