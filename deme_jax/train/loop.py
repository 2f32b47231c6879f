"""``train_and_evaluate(config, workdir)``: the training loop, from a config to checkpoints.

The loop restores the latest checkpoint in ``workdir`` if there is one, so the
same command starts and continues a run. Batches, noise and timesteps are pure
functions of (seed, step), so a resumed run computes what the uninterrupted one
would have, bit for bit on CPU.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from deme_jax.data import heldout_images, make_stream
from deme_jax.diffusion import ddim_sample, make_schedule
from deme_jax.images import image_grid, save_image_grid, to_uint8
from deme_jax.models import UNet2D, init_params
from deme_jax.train.checkpoints import Checkpoints, abstract_with_shardings
from deme_jax.train.sharding import batch_sharding, global_batch, make_mesh, replicated, state_shardings
from deme_jax.train.state import create_train_state, make_optimizer
from deme_jax.train.step import make_heldout_loss, make_train_step
from deme_jax.train.validate import validate_config


class NonFiniteLossError(FloatingPointError):
    pass


def build_model(model_config) -> UNet2D:
    fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in model_config.items()}
    fields["dtype"] = jnp.dtype(fields.get("dtype", "float32"))
    return UNet2D(**fields)


def build_schedule(diffusion_config):
    return make_schedule(**diffusion_config)


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
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(np.int32(self.requested)).any())

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)


def host_value(x) -> np.ndarray:
    """A replicated global array as a numpy array on every process."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def interval_scalars(prefix: str, sums: np.ndarray, counts: np.ndarray, num_train_timesteps: int) -> dict:
    """``{prefix}/loss_t{low}-{high}``: the mean loss of each timestep interval that had examples."""
    K, T = len(sums), num_train_timesteps
    return {f"{prefix}/loss_t{k * T // K}-{(k + 1) * T // K}": float(sums[k] / counts[k]) for k in range(K)
            if counts[k]}


def train_and_evaluate(config, workdir: str | Path):
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the final train state."""
    validate_config(config, workdir)
    workdir = Path(workdir)
    train = config.train
    model, schedule = build_model(config.model), build_schedule(config.diffusion)
    T, K = schedule.num_train_timesteps, train.loss_intervals
    optimizer = make_optimizer(config.optim)
    mesh = make_mesh()
    data_sharding, repl = batch_sharding(mesh), replicated(mesh)
    stream = make_stream(config.data, train.batch_size, config.seed, jax.process_index(), jax.process_count())

    rng_params, rng_state, rng_eval = jax.random.split(jax.random.key(config.seed), 3)
    init_state = lambda: create_train_state(init_params(model, rng_params), optimizer, rng_state)
    abstract = jax.eval_shape(init_state)
    shardings = state_shardings(mesh, abstract, config.mesh.fsdp)
    checkpoints = Checkpoints(workdir, keep=train.keep_checkpoints)
    latest = checkpoints.latest_step()
    if latest is None:
        state = jax.jit(init_state, out_shardings=shardings)()
        start = 0
    else:
        state, data_state = checkpoints.restore(latest, abstract_with_shardings(abstract, shardings))
        start = int(data_state["step"])
        logging.info("Resumed from the checkpoint at step %d in %s.", latest, workdir / "checkpoints")
    config_json = json.loads(config.to_json())
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")

    step_fn = make_train_step(model, schedule, optimizer, config.ema, K)
    local_rows = train.batch_size // jax.process_count()
    image_shape = (train.batch_size, config.data.image_size, config.data.image_size, config.data.channels)
    compile_start = time.perf_counter()
    train_step = jax.jit(step_fn, in_shardings=(shardings, data_sharding), out_shardings=(shardings, repl),
                         donate_argnums=0).lower(
        abstract_with_shardings(abstract, shardings), jax.ShapeDtypeStruct(image_shape, jnp.float32,
                                                                           sharding=data_sharding)).compile()
    logging.info("Compiled the train step in %.1f s (%d rows per process).", time.perf_counter() - compile_start,
                 local_rows)

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start == 0:
        writer.write_hparams({k: v for k, v in _flatten(config_json).items() if isinstance(v, (int, float, str))})
    heldout = jax.device_put(heldout_images(config.data, config.eval.num_images), repl)
    heldout_loss = jax.jit(make_heldout_loss(model, schedule, K), out_shardings=repl)
    sample_noise = jax.device_put(
        np.asarray(jax.random.normal(jax.random.key(config.seed + 1), (config.sample.num_images,) + image_shape[1:])),
        repl)
    report = periodic_actions.ReportProgress(num_train_steps=train.num_steps, writer=writer, every_secs=30)
    preemption = Preemption()
    pending = []  # per-step metrics not yet read back: reading every step would stall dispatch

    def flush_metrics(step: int) -> None:
        if not pending:
            return
        rows = jax.device_get(pending)
        pending.clear()
        for offset, row in enumerate(rows):
            if row["nonfinite"]:
                bad = step - len(rows) + offset + 1
                kept = checkpoints.latest_step()
                raise NonFiniteLossError(
                    f"The loss or gradient became non-finite at step {bad} (loss={row['loss']}, grad_norm="
                    f"{row['grad_norm']}); that update was not applied and nothing after it was saved. The last "
                    f"good checkpoint ({'step ' + str(kept) if kept is not None else 'none yet'}) in "
                    f"{workdir / 'checkpoints'} is intact. Lower config.optim.lr or set config.optim.grad_clip.")
        sums = np.sum([r["interval_loss_sum"] for r in rows], axis=0)
        counts = np.sum([r["interval_count"] for r in rows], axis=0)
        writer.write_scalars(step, {"train/loss": float(np.mean([r["loss"] for r in rows])),
                                    "train/grad_norm": float(np.mean([r["grad_norm"] for r in rows])),
                                    **interval_scalars("train", sums, counts, T)})

    def evaluate(step: int) -> None:
        sums, counts = (host_value(x) for x in heldout_loss(state.ema_params, heldout, rng_eval))
        writer.write_scalars(step, {"heldout/loss": float(sums.sum() / counts.sum()),
                                    **interval_scalars("heldout", sums, counts, T)})

    def sample(step: int) -> None:
        from jax.experimental import multihost_utils

        images = ddim_sample(model, state.ema_params, schedule, sample_noise, config.sample.ddim_steps)
        images = multihost_utils.process_allgather(images, tiled=True)  # whatever sharding XLA chose
        writer.write_images(step, {"samples": image_grid(to_uint8(images))[None]})
        if jax.process_index() == 0:
            save_image_grid(images, workdir / "samples" / f"step_{step:07d}.png")

    step = start
    try:
        for step in range(start + 1, train.num_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                images = global_batch(stream.batch(step - 1), data_sharding)
                state, metrics = train_step(state, images)
            pending.append(metrics)
            report(step)
            last = step == train.num_steps
            stop = preemption.agreed()
            if step % train.log_every == 0 or last or stop:
                flush_metrics(step)
            if train.eval_every and (step % train.eval_every == 0 or last):
                with report.timed("heldout"):
                    evaluate(step)
            if train.sample_every and (step % train.sample_every == 0 or last):
                with report.timed("sample"):
                    sample(step)
            if step % train.checkpoint_every == 0 or last or stop:
                flush_metrics(step)
                checkpoints.save(step, state, {"step": step}, config_json)
            if stop:
                logging.warning("Saved step %d after SIGTERM; run the same command to continue.", step)
                break
    finally:
        checkpoints.wait()
        checkpoints.close()
        writer.flush()
        preemption.restore()
    return state


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
