"""``train_and_evaluate(config, workdir)``: the training loop, from a config to checkpoints.

The loop restores the latest checkpoint in ``workdir`` if there is one, so the
same command starts and continues a run. Batches, noise and timesteps are pure
functions of (seed, step), so a resumed run computes what the uninterrupted one
would have, bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from jax.sharding import Mesh

from deme_jax.data import heldout_images, make_stream
from deme_jax.diffusion import ddim_sample, make_schedule
from deme_jax.diffusion.timesteps import interval_labels, uniform_partition
from deme_jax.images import image_grid, save_image_grid, to_uint8
from deme_jax.models import build_model, init_params
from deme_jax.randomness import stream_key, stream_seed
from deme_jax.train.checkpoints import Checkpoints, abstract_with_shardings, is_disk_full
from deme_jax.train.sharding import (
    batch_sharding,
    global_batch,
    make_mesh,
    replicated,
    state_shardings,
)
from deme_jax.train.state import TrainState, create_train_state, make_optimizer
from deme_jax.train.step import make_heldout_loss, make_train_step, microbatch_size
from deme_jax.train.validate import require, validate_config
from deme_jax.train.workdir import WorkdirBusyError, WorkdirLock, open_run


class NonFiniteLossError(FloatingPointError):
    pass


class Preempted(Exception):
    """SIGTERM stopped the run after it saved a checkpoint; the same command continues it. Raised, not returned,
    so that nothing meant for a finished run (the next replica, a merge, a report) follows."""


class Preemption:
    """Turns SIGTERM into a request to save and stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping after this step.")
        self.requested = True

    def agreed(self) -> bool:
        """True on every process once any process was asked to stop."""
        return any_process(self.requested)

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any; every process must call it (a collective)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.int32(flag)).any())


def host_value(x) -> np.ndarray:
    """A replicated global array as a numpy array on every process."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def interval_scalars(prefix: str, sums: np.ndarray, counts: np.ndarray, boundaries) -> dict:
    """``{prefix}/loss_t{low}-{high}``: the mean loss of each timestep interval that had examples."""
    labels = interval_labels(boundaries)
    return {f"{prefix}/loss_t{label}": float(sums[k] / counts[k]) for k, label in enumerate(labels) if counts[k]}


def report_boundaries(config) -> np.ndarray:
    """The equal timestep intervals that training and held-out losses are reported on."""
    return uniform_partition(config.diffusion.num_train_timesteps, config.train.loss_intervals)


@dataclasses.dataclass
class Job:
    """What one training run computes; ``run_training`` adds checkpoints, metrics, evaluation and preemption.

    With ``num_replicas`` set, every leaf of the state has a leading replica
    axis, ``step`` trains all replicas at once, and metrics come per replica.
    """

    init_state: Callable[[], TrainState]
    step: Callable  # (state, batch, *step_args) -> (state, metrics)
    batch: Callable[[int], object]  # 0-based step -> the global batch (an array or a pytree), laid out as batch_spec
    batch_spec: object  # the global batch's shapes, dtypes and shardings (jax.ShapeDtypeStruct leaves)
    state_shardings: Callable  # abstract state -> shardings
    mesh: Mesh
    heldout_loss: Callable  # (ema_params, heldout batch, rng) -> per-interval (sums, counts)
    sample: Callable | None = None  # (ema_params, noise) -> images
    step_args: tuple = ()  # further jitted arguments, e.g. the frozen teacher (laid out by their shardings)
    num_replicas: int | None = None
    heldout: Callable | None = None  # () -> the held-out batch; default: config.data's held-out images
    sample_shape: tuple | None = None  # of one sample's initial noise; default: an image of the batch


def train_and_evaluate(config, workdir: str | Path):
    """Trains the DDPM of ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the final state."""
    validate_config(config, workdir)
    replicas = config.mesh.shape.get("replica", 0)
    require(replicas in (0, 1), f"config.mesh.shape replica={replicas}: pretraining trains one model; give its "
                                "devices to `data`.")
    model, schedule = build_model(config.model), make_schedule(**config.diffusion)
    optimizer = make_optimizer(config.optim)
    mesh = make_mesh(config.mesh.shape)
    boundaries = report_boundaries(config)
    data_sharding = batch_sharding(mesh)
    stream = make_stream(config.data, config.train.batch_size, stream_seed(config.seed, "data"), jax.process_index(),
                         jax.process_count())
    job = Job(
        init_state=lambda: create_train_state(init_params(model, stream_key(config.seed, "params")), optimizer,
                                              stream_key(config.seed, "train")),
        step=make_train_step(model, schedule, optimizer, config.ema, boundaries,
                             grad_accum_steps=config.train.grad_accum_steps),
        batch=lambda step: global_batch(stream.batch(step), data_sharding),
        batch_spec=jax.ShapeDtypeStruct(batch_shape(config), jnp.float32, sharding=data_sharding),
        state_shardings=lambda abstract: state_shardings(mesh, abstract, config.mesh.fsdp),
        mesh=mesh,
        heldout_loss=make_heldout_loss(model, schedule, boundaries, microbatch_size(config.train)),
        sample=lambda params, noise: ddim_sample(model, params, schedule, noise, config.sample.ddim_steps),
    )
    return run_training(config, workdir, job)


def batch_shape(config) -> tuple[int, int, int, int]:
    data = config.data
    return (config.train.batch_size, data.image_size, data.image_size, data.channels)


def run_training(config, workdir: str | Path, job: Job):
    """Runs ``job`` for ``config.train.num_steps`` steps in ``workdir``, resuming from its latest checkpoint.

    What can refuse the run (held-out data, a live run in the workdir, a config
    the checkpoint cannot hold) is checked before anything compiles or is written.
    """
    workdir = Path(workdir)
    config_json = json.loads(config.to_json())
    heldout = None
    if config.train.eval_every:
        heldout = job.heldout() if job.heldout else heldout_images(config.data, config.eval.num_images)
    with open_run(workdir, config_json) as lock:
        checkpoints = Checkpoints(workdir, keep=config.train.keep_checkpoints)
        try:
            state = train_loop(config, config_json, workdir, job, checkpoints, heldout, lock)
        except Exception as err:
            try:  # orbax's background writers stop here, so no traceback of theirs follows the error
                checkpoints.close()
            except Exception as close_err:
                logging.warning("Closing the checkpoints after the error: %s", close_err)
            if is_disk_full(err):
                raise checkpoints.disk_full_error() from err
            raise
        checkpoints.close()
        return state


def train_loop(config, config_json: dict, workdir: Path, job: Job, checkpoints: Checkpoints, heldout,
               lock: WorkdirLock):
    """Restores or initialises the state, compiles the step and trains, logs, evaluates, samples and saves; stops
    before a save if another run has taken the workdir over (``lock.lost``)."""
    train = config.train
    boundaries = report_boundaries(config)
    repl = replicated(job.mesh)
    rng_eval = stream_key(config.seed, "heldout_noise")  # the same noise at every evaluation

    abstract = jax.eval_shape(job.init_state)
    shardings = job.state_shardings(abstract)
    restored = checkpoints.restore_latest(abstract_with_shardings(abstract, shardings))
    if restored is None:
        state = jax.jit(job.init_state, out_shardings=shardings)()
        start = 0
    else:
        state, data_state, latest = restored
        start = int(data_state["step"])
        logging.info("Resumed from the checkpoint at step %d in %s.", latest, workdir / "checkpoints")

    args_spec = tuple(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), a)
                      for a in job.step_args)
    batch_shapes = jax.tree_util.tree_map(lambda x: x.shape, job.batch_spec)
    logging.info("Compiling the train step (global batch %s).", batch_shapes)
    compile_start = time.perf_counter()
    train_step = jax.jit(job.step, out_shardings=(shardings, repl), donate_argnums=0).lower(
        abstract_with_shardings(abstract, shardings), job.batch_spec, *args_spec).compile()
    logging.info("Compiled the train step in %.1f s (global batch %s).", time.perf_counter() - compile_start,
                 batch_shapes)

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start == 0:
        writer.write_hparams({k: v for k, v in _flatten(config_json).items() if isinstance(v, (int, float, str))})
    heldout = None if heldout is None else jax.device_put(heldout, repl)
    heldout_loss = job.heldout_loss if job.num_replicas is None else jax.vmap(job.heldout_loss, (0, None, None))
    heldout_loss = jax.jit(heldout_loss, out_shardings=repl)
    sample_shape = job.sample_shape or job.batch_spec.shape[-3:]
    sample_noise = jax.device_put(
        np.asarray(jax.random.normal(stream_key(config.seed, "sample_noise"),
                                     (config.sample.num_images, *sample_shape))), repl)
    report = periodic_actions.ReportProgress(num_train_steps=train.num_steps, writer=writer, every_secs=30)
    preemption = Preemption()
    pending = []  # per-step metrics not yet read back: reading every step would stall dispatch

    def flush_metrics(step: int) -> None:
        if not pending:
            return
        rows = jax.device_get(pending)
        pending.clear()
        for offset, row in enumerate(rows):
            if np.any(row["nonfinite"]):
                bad = step - len(rows) + offset + 1
                kept = checkpoints.latest_step()
                raise NonFiniteLossError(
                    f"The loss or gradient became non-finite at step {bad} (loss={row['loss']}, grad_norm="
                    f"{row['grad_norm']}); that update was not applied and nothing after it was saved. The last "
                    f"good checkpoint ({'step ' + str(kept) if kept is not None else 'none yet'}) in "
                    f"{workdir / 'checkpoints'} is intact. Lower config.optim.lr or set config.optim.grad_clip.")
        loss = np.mean([r["loss"] for r in rows], axis=0)
        grad_norm = np.mean([r["grad_norm"] for r in rows], axis=0)
        sums = np.sum([r["interval_loss_sum"] for r in rows], axis=0)
        counts = np.sum([r["interval_count"] for r in rows], axis=0)
        scalars = {"train/loss": float(np.mean(loss)), "train/grad_norm": float(np.mean(grad_norm))}
        if job.num_replicas is None:
            scalars.update(interval_scalars("train", sums, counts, boundaries))
        else:
            for i in range(job.num_replicas):
                scalars.update({f"train/replica{i}/loss": float(loss[i]),
                                f"train/replica{i}/grad_norm": float(grad_norm[i]),
                                **interval_scalars(f"train/replica{i}", sums[i], counts[i], boundaries)})
        writer.write_scalars(step, scalars)

    def evaluate(step: int) -> None:
        logging.info("Held-out loss of the EMA weights at step %d.", step)
        sums, counts = (host_value(x) for x in heldout_loss(state.ema_params, heldout, rng_eval))
        if job.num_replicas is None:
            scalars = {"heldout/loss": float(sums.sum() / counts.sum()),
                       **interval_scalars("heldout", sums, counts, boundaries)}
        else:
            scalars = {}
            for i in range(job.num_replicas):
                scalars.update({f"heldout/replica{i}/loss": float(sums[i].sum() / counts[i].sum()),
                                **interval_scalars(f"heldout/replica{i}", sums[i], counts[i], boundaries)})
        writer.write_scalars(step, scalars)

    def sample(step: int) -> None:
        from jax.experimental import multihost_utils

        images = job.sample(state.ema_params, sample_noise)
        images = multihost_utils.process_allgather(images, tiled=True)  # whatever sharding XLA chose
        writer.write_images(step, {"samples": image_grid(to_uint8(images))[None]})
        if jax.process_index() == 0:
            save_image_grid(images, workdir / "samples" / f"step_{step:07d}.png")

    step, stop = start, False
    try:
        for step in range(start + 1, train.num_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = train_step(state, job.batch(step - 1), *job.step_args)
            pending.append(metrics)
            report(step)
            last = step == train.num_steps
            stop = preemption.agreed()
            if step % train.log_every == 0 or last or stop:
                flush_metrics(step)
            if train.eval_every and (step % train.eval_every == 0 or last) and not stop:  # the grace period is
                with report.timed("heldout"):                                           # for saving
                    evaluate(step)
            if job.sample and train.sample_every and (step % train.sample_every == 0 or last) and not stop:
                with report.timed("sample"):
                    sample(step)
            if step % train.checkpoint_every == 0 or last or stop:
                flush_metrics(step)
                if any_process(lock.lost):
                    raise WorkdirBusyError(
                        f"Another run took --workdir={workdir} over while this one ran (this run's heartbeat had "
                        f"stopped for {lock.stale_after_s:.0f} s); this run stops without saving step {step}, so as "
                        f"to leave the other run's checkpoints alone.")
                checkpoints.save(step, state, {"step": step}, config_json)
            if stop:
                break
    finally:
        checkpoints.wait()
        writer.flush()
        preemption.restore()
    if stop:
        raise Preempted(f"stopped by SIGTERM after saving step {step} of {train.num_steps} in "
                        f"{workdir / 'checkpoints'}; run the same command to continue.")
    return state


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
