"""The jitted training step and the held-out loss, both pure functions of their inputs."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deme_jax.diffusion import NoiseSchedule, add_noise, epsilon_loss, prediction_target
from deme_jax.diffusion.timesteps import interval_means, interval_sums, spread_timesteps
from deme_jax.train.state import TrainState, ema_decay, ema_update

# (rng, batch_size, task) -> int32 timesteps of shape (batch_size,)
TimestepSampler = Callable[[jax.Array, int, object], jax.Array]
# (prediction, target, x_t, t, conditioning, task) -> per-example loss of shape (batch_size,); the target is the
# noise (or v, for a v-prediction schedule) and the conditioning the model's further inputs (text states)
PerExampleLoss = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, tuple, object], jax.Array]
# (per-example loss, t, loss parameters) -> the scalar to minimise
LossReduction = Callable[[jax.Array, jax.Array, dict], jax.Array]

# A top-level entry of the parameters that the model never sees: trainable
# parameters of the loss itself (ANT-UW's log-variances). Exports drop it.
LOSS_PARAMS = "loss_params"


def model_params(params: dict) -> dict:
    """The parameters without the loss's own (``LOSS_PARAMS``)."""
    return {k: v for k, v in params.items() if k != LOSS_PARAMS}


def uniform_timesteps(num_train_timesteps: int) -> TimestepSampler:
    return lambda rng, n, task: jax.random.randint(rng, (n,), 0, num_train_timesteps, jnp.int32)


def denoising_loss(prediction, target, x_t, t, conditioning, task):
    return epsilon_loss(prediction, target)


def split_batch(batch) -> tuple[jax.Array, tuple]:
    """``(x0, conditioning)`` of a training batch: images (an array) for an unconditional model, or a text-to-image
    batch ``{"latents", "text"}`` whose text states the model takes after the timesteps."""
    if isinstance(batch, dict):
        return batch["latents"], (batch["text"],)
    return batch, ()


def microbatch_size(train) -> int:
    """The rows one forward pass of training holds (``config.train``): the size held-out losses run in."""
    return train.batch_size // train.grad_accum_steps


def microbatches(x: jax.Array, k: int) -> jax.Array:
    """``(B, ...) -> (k, B / k, ...)``: microbatch ``j`` holds rows ``j, j + k, ...``, so every device's rows of a
    batch split over ``data`` stay on it (each device keeps ``B / (k * devices)`` rows of every microbatch)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def from_microbatches(x: jax.Array) -> jax.Array:
    """The inverse of ``microbatches``: rows back in batch order."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def timesteps_per_microbatch(sample_timesteps: TimestepSampler, rng: jax.Array, batch_size: int, task,
                             k: int) -> jax.Array:
    """The sampler's timesteps for a batch of ``k`` microbatches, each drawn on its own (microbatch ``j`` with
    ``fold_in(rng, j)``; ``k = 1``: ``rng``), in batch order: a sampler's per-batch choices (DeMe's global-or-interval
    draw, its antithetic pairs) are made per forward batch, as in a PyTorch loop that accumulates gradients."""
    if k == 1:
        return sample_timesteps(rng, batch_size, task)
    draw = lambda j: sample_timesteps(jax.random.fold_in(rng, j), batch_size // k, task)
    return from_microbatches(jax.vmap(draw)(jnp.arange(k)))


def accumulate_gradients(loss_fn, params, batch, rng: jax.Array, k: int):
    """``(loss, aux), grads`` of ``loss_fn(params, batch, rng) -> (loss, aux)`` averaged over ``k`` microbatches.

    ``batch`` and ``aux`` are pytrees of arrays with the batch as leading axis.
    The microbatches run one after another in a ``lax.scan``, so only one
    microbatch's activations are alive at a time; for equal microbatches and a
    loss that is a mean over examples, the result is the full batch's up to
    float rounding. Microbatch ``j`` gets ``fold_in(rng, j)`` (``k = 1``: ``rng``).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
        return grad_fn(params, batch, rng)

    def accumulate(grad_sum, inputs):
        j, micro = inputs
        (loss, aux), grads = grad_fn(params, micro, jax.random.fold_in(rng, j))
        return jax.tree_util.tree_map(jnp.add, grad_sum, grads), (loss, aux)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    split = jax.tree_util.tree_map(lambda x: microbatches(x, k), batch)
    grad_sum, (losses, aux) = jax.lax.scan(accumulate, zeros, (jnp.arange(k), split))
    grads = jax.tree_util.tree_map(lambda g: g / k, grad_sum)
    return (losses.mean(), jax.tree_util.tree_map(from_microbatches, aux)), grads


def make_train_step(model, schedule: NoiseSchedule, optimizer: optax.GradientTransformation, ema_config,
                    report_boundaries, sample_timesteps: TimestepSampler | None = None,
                    per_example_loss: PerExampleLoss = denoising_loss, reduce_loss: LossReduction | None = None,
                    grad_accum_steps: int = 1, frozen_variables: Callable[[object], dict] | None = None):
    """Builds ``step(state, batch, task=None) -> (state, metrics)``; by default the DDPM objective.

    ``batch``: images, or latents with their text states (``split_batch``).

    The loss is also reported per interval of ``report_boundaries``.
    ``task`` (any pytree) reaches the timestep sampler and the loss: DeMe passes
    each replica's interval and the frozen teacher there. ``reduce_loss``
    replaces the batch mean, with ``params[LOSS_PARAMS]`` as its parameters.
    ``grad_accum_steps`` splits the batch into that many microbatches whose
    gradients are averaged (``accumulate_gradients``) before one update.
    ``frozen_variables(task)``: variable collections the model reads besides
    the trained ``params`` (a LoRA student's frozen base weights).

    All randomness comes from ``fold_in(state.rng, state.step)``; noise is drawn
    for the global batch and timesteps per microbatch
    (``timesteps_per_microbatch``), so a step gives the same result however the
    batch is sharded, and after a restart; with another ``grad_accum_steps`` it
    draws other timesteps (and dropout masks, drawn per microbatch). A step
    whose loss or gradient norm is not finite leaves the state untouched and
    reports ``nonfinite`` = 1, so no checkpoint ever holds its result.
    """
    T = schedule.num_train_timesteps
    sample_timesteps = sample_timesteps or uniform_timesteps(T)

    def step(state: TrainState, batch, task=None):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        rng_t, rng_noise, rng_dropout = jax.random.split(rng, 3)
        x0, conditioning = split_batch(batch)
        t = timesteps_per_microbatch(sample_timesteps, rng_t, x0.shape[0], task, grad_accum_steps)
        noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)

        def loss_fn(params, batch, rng):
            x0, noise, t, conditioning = batch
            x_t = add_noise(schedule, x0, noise, t)
            variables = {"params": model_params(params), **(frozen_variables(task) if frozen_variables else {})}
            prediction = model.apply(variables, x_t, t, *conditioning, train=True, rngs={"dropout": rng})
            target = prediction_target(schedule, x0, noise, t)
            per_example = per_example_loss(prediction, target, x_t, t, conditioning, task)
            if reduce_loss is None:
                return per_example.mean(), per_example
            return reduce_loss(per_example, t, params[LOSS_PARAMS]), per_example

        (loss, per_example), grads = accumulate_gradients(loss_fn, state.params, (x0, noise, t, conditioning),
                                                          rng_dropout, grad_accum_steps)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state,
            ema_params=ema_update(state.ema_params, params, ema_decay(state.step, ema_config)))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        sums, counts = interval_sums(per_example, t, report_boundaries)
        metrics = {"loss": loss, "grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.int32),
                   "interval_loss_sum": sums, "interval_count": counts}
        return new_state, metrics

    return step


def map_in_chunks(fn, inputs, chunk: int | None):
    """``fn(inputs)`` for a pytree of arrays with a leading batch axis, run ``chunk`` rows at a time (one
    ``lax.map`` body, rematerialised under differentiation), so memory holds one chunk's activations; the last
    chunk is padded with zero rows, whose outputs are dropped. ``None``, or a batch no larger: one call."""
    n = jax.tree_util.tree_leaves(inputs)[0].shape[0]
    if chunk is None or n <= chunk:
        return fn(inputs)
    pad = -n % chunk
    chunks = jax.tree_util.tree_map(
        lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, chunk, *x.shape[1:]), inputs)
    outputs = jax.lax.map(jax.checkpoint(fn), chunks)
    return jax.tree_util.tree_map(lambda y: y.reshape(-1, *y.shape[2:])[:n], outputs)


def make_heldout_losses(model, schedule: NoiseSchedule, chunk: int | None = None):
    """``losses(params, batch, rng) -> (per-example loss, t)`` at evenly spread timesteps and fixed noise; ``batch``
    as the training step takes it. The timesteps and noise are the whole batch's; the model runs ``chunk`` rows at
    a time (``map_in_chunks``: a held-out set larger than a training microbatch need not fit at once)."""

    def heldout_losses(params, batch, rng):
        x0, conditioning = split_batch(batch)
        t = spread_timesteps(x0.shape[0], schedule.num_train_timesteps)
        noise = jax.random.normal(rng, x0.shape, x0.dtype)
        predict = lambda inputs: model.apply({"params": model_params(params)}, *inputs)
        prediction = map_in_chunks(predict, (add_noise(schedule, x0, noise, t), t, *conditioning), chunk)
        return epsilon_loss(prediction, prediction_target(schedule, x0, noise, t)), t

    return heldout_losses


def make_heldout_loss(model, schedule: NoiseSchedule, boundaries, chunk: int | None = None):
    """``loss(params, batch, rng) -> (sums, counts)`` of the held-out losses per interval of ``boundaries``."""
    losses = make_heldout_losses(model, schedule, chunk)
    return lambda params, batch, rng: interval_sums(*losses(params, batch, rng), boundaries)


def make_interval_loss(model, schedule: NoiseSchedule, batch, boundaries, rng, chunk: int | None = None):
    """``loss(params, rng=rng) -> (N,)`` numpy held-out loss per interval of ``boundaries`` on ``batch``.

    The noise is ``rng``'s unless another key is passed; one compilation serves every key.
    """
    losses = make_heldout_losses(model, schedule, chunk)
    fn = jax.jit(lambda params, batch, rng: interval_means(*losses(params, batch, rng), boundaries))
    return lambda params, rng=rng: np.asarray(fn(params, batch, rng))
