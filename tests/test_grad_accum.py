"""Gradient accumulation: k microbatches make the full batch's optimizer step, in less memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from deme_jax.deme import replicas, uniform_partition
from deme_jax.deme.intervals import interval_timesteps
from deme_jax.deme.objective import uncertainty_reduction
from deme_jax.deme.replicas import (
    init_replicas,
    interval_tasks,
    make_replica_step,
    map_over_replicas,
    with_identity_projections,
)
from deme_jax.diffusion import make_schedule
from deme_jax.models import UNet2D, init_params
from deme_jax.train import ConfigError, train_and_evaluate, validate_config
from deme_jax.train.sharding import make_mesh
from deme_jax.train.state import create_train_state
from deme_jax.train.step import (
    LOSS_PARAMS,
    make_heldout_losses,
    make_train_step,
    timesteps_per_microbatch,
    uniform_timesteps,
)
from tests import tiny_config
from tests.runs import assert_trees_equal, final_params

# No dropout: its masks are drawn per microbatch, so only a model without it gives the full batch's step.
MODEL = UNet2D(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,),
               down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
               layers_per_block=1, norm_num_groups=4)
EMA = ConfigDict(dict(max_decay=0.999, inv_gamma=1.0, power=0.75))
BOUNDARIES = uniform_partition(1000, 4)
# SGD at lr 1 moves the parameters by minus the gradient, so the parameters compare the gradients themselves.
OPTIMIZER = optax.sgd(1.0)


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def assert_same_step(full, accumulated, start):
    """One optimizer step each: the same loss, gradient (parameter move), EMA and per-interval losses.

    The tolerances are float32 rounding: the mean of k microbatch means and the sum of k gradients add in
    another order than one mean over the batch.
    """
    (state_1, metrics_1), (state_k, metrics_k) = full, accumulated
    np.testing.assert_array_equal(state_k.step, state_1.step)
    np.testing.assert_allclose(metrics_k["loss"], metrics_1["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_k["grad_norm"], metrics_1["grad_norm"], rtol=1e-5)
    np.testing.assert_array_equal(metrics_k["interval_count"], metrics_1["interval_count"])
    np.testing.assert_allclose(metrics_k["interval_loss_sum"], metrics_1["interval_loss_sum"], rtol=1e-6)
    for field in ("params", "ema_params"):
        move_1, move_k = (flat(getattr(s, field)) - flat(getattr(start, field)) for s in (state_1, state_k))
        assert np.linalg.norm(move_1) > 0
        assert np.linalg.norm(move_k - move_1) / np.linalg.norm(move_1) < 1e-5


@functools.cache
def pretrained() -> dict:
    return jax.jit(lambda rng: init_params(MODEL, rng))(jax.random.key(0))  # one compilation, not op by op


def drawn_as_microbatches(sample, k: int):
    """``sample`` wrapped to draw a whole batch's timesteps as ``k`` microbatches would: a full-batch step given it
    sees the timesteps of the step that accumulates ``k`` microbatches."""
    return lambda rng, n, task: timesteps_per_microbatch(sample, rng, n, task, k)


@functools.cache
def plain_step(k: int):
    """The compiled DDPM step with ``k`` microbatches on a batch of 16 (timesteps drawn as 4 microbatches), its
    start state and its output."""
    state = create_train_state(pretrained(), OPTIMIZER, jax.random.key(1))
    images = jax.random.normal(jax.random.key(2), (16, 8, 8, 1))
    uniform = uniform_timesteps(1000)
    step = make_train_step(MODEL, make_schedule(), OPTIMIZER, EMA, BOUNDARIES,
                           uniform if k == 4 else drawn_as_microbatches(uniform, 4), grad_accum_steps=k)
    compiled = jax.jit(step).lower(state, images).compile()
    return compiled, state, compiled(state, images)


def test_accumulated_step_equals_the_full_batch_step():
    (_, start, full), (_, _, accumulated) = plain_step(1), plain_step(4)
    assert_same_step(full, accumulated, start)


def test_accumulation_needs_less_compiled_memory():
    """Ahead of time: the step's temporaries (activations for the backward pass) shrink with the microbatch."""
    full, accumulated = (plain_step(k)[0].memory_analysis().temp_size_in_bytes for k in (1, 4))
    assert accumulated < 0.5 * full, (accumulated, full)


def test_each_microbatch_makes_its_own_global_or_interval_choice():
    """As the reference's accumulating loop: every forward batch (microbatch) draws global-vs-interval with p and
    its own antithetic pairs; rows of microbatch j are rows j, j + k, ... of the batch."""
    k, batch, low, high = 4, 32, 0, 250
    sample = lambda rng, n, task: interval_timesteps(rng, n, low, high, 1000, 0.5)
    draws = np.stack([np.asarray(timesteps_per_microbatch(sample, jax.random.key(i), batch, None, k))
                      for i in range(40)])
    micro = np.stack([draws[:, j::k] for j in range(k)], axis=1)  # (draw, microbatch, row)
    is_global = (micro >= high).any(axis=-1)
    mixed = is_global.any(axis=1) & ~is_global.all(axis=1)
    assert mixed.sum() >= 20, is_global  # P(a draw's 4 microbatches agree) = 1/8
    lo, hi = np.where(is_global, 0, low)[..., None], np.where(is_global, 1000, high)[..., None]
    n = batch // k
    drawn = n // 2 + 1  # then the mirrors of the first n - drawn, all within the microbatch
    np.testing.assert_array_equal(micro[..., drawn:], lo + hi - 1 - micro[..., :n - drawn])
    whole = np.stack([np.asarray(timesteps_per_microbatch(sample, jax.random.key(i), batch, None, 1))
                      for i in range(40)])
    assert set(((whole >= high).any(axis=1)) ^ ((whole < high).all(axis=1))) == {True}  # k=1: the whole batch


@pytest.mark.slow  # the unstacked step's accumulation is checked by default
def test_accumulated_stacked_replica_step_equals_the_full_batch_step(monkeypatch):
    """DeMe's step on stacked replicas: interval sampler with p, teacher, projections and ANT-UW's learnt weights."""
    n, schedule = 2, make_schedule()
    teacher_params = pretrained()
    student, params = with_identity_projections(MODEL, teacher_params)
    params = {**params, LOSS_PARAMS: {"log_variances": jnp.zeros((4,), jnp.float32)}}
    task = interval_tasks(uniform_partition(1000, n), teacher_params)
    state = init_replicas(params, OPTIMIZER, jax.random.split(jax.random.key(1), n))
    images = jax.random.normal(jax.random.key(2), (n, 8, 8, 8, 1))
    mesh = make_mesh({"replica": 0, "data": -1}, n)
    outputs, temp = [], []
    for k in (1, 4):
        if k == 1:  # the interval sampler drawing as 4 microbatches, for the same timesteps as k=4's
            sample = replicas.interval_timesteps
            monkeypatch.setattr(replicas, "interval_timesteps", lambda rng, n, *args: timesteps_per_microbatch(
                lambda r, m, task: sample(r, m, *args), rng, n, None, 4))
        else:
            monkeypatch.undo()
        step = make_replica_step(student, MODEL, schedule, OPTIMIZER, EMA, BOUNDARIES, global_prob=0.3,
                                 reduce_loss=uncertainty_reduction(1000, 4), grad_accum_steps=k)
        compiled = jax.jit(map_over_replicas(step, mesh)).lower(state, images, task).compile()
        temp.append(compiled.memory_analysis().temp_size_in_bytes)
        outputs.append(compiled(state, images, task))
    assert_same_step(*outputs, state)
    assert temp[1] < 0.5 * temp[0], temp


@pytest.mark.parametrize("batch_size, k, devices", [(8, 3, 1), (8, 4, 4), (8, 0, 1)])
def test_batch_not_divisible_into_microbatches_names_the_fields(batch_size, k, devices, tmp_path):
    config = tiny_config.get_config()
    config.train.update(dict(batch_size=batch_size, grad_accum_steps=k))
    fields = r"config\.train\.grad_accum_steps=0 must be an int >= 1" if k == 0 else (
        rf"config\.train\.batch_size={batch_size} does not split into config\.train\.grad_accum_steps={k} equal "
        rf"microbatches over the {devices} devices.*multiple of {k} x {devices} = {k * devices}")
    with pytest.raises(ConfigError, match=fields):
        validate_config(config, tmp_path, data_devices=devices)
    config.train.grad_accum_steps = 2
    validate_config(config, tmp_path, data_devices=devices)


@pytest.mark.slow
def test_accumulating_run_resumes_bit_identically(tmp_path):
    """Through the training loop: a run with microbatches stopped and continued equals the uninterrupted one bit
    for bit (the full batch's step is compared with the accumulated one above, at the same timesteps)."""
    config = tiny_config.get_config()
    config.train.update(dict(num_steps=4, grad_accum_steps=2, checkpoint_every=2, eval_every=0, sample_every=0))
    train_and_evaluate(config, tmp_path / "whole")
    config.train.num_steps = 2
    train_and_evaluate(config, tmp_path / "resumed")
    config.train.num_steps = 4
    train_and_evaluate(config, tmp_path / "resumed")
    (step, whole), (_, resumed) = (final_params(tmp_path / d) for d in ("whole", "resumed"))
    assert step == 4
    assert_trees_equal(resumed, whole)


def test_heldout_losses_in_chunks_equal_the_whole_batch_and_need_less_memory():
    """The held-out set runs a training microbatch at a time (the last chunk padded): the same per-example
    losses and timesteps, and gradients (the gradient merge search differentiates through it), as one call;
    ahead of time, fewer temporaries."""
    images = jax.random.normal(jax.random.key(3), (22, 8, 8, 1))  # 22 = 4 chunks of 5 + 2 padded rows
    whole, chunked = (make_heldout_losses(MODEL, make_schedule(), chunk) for chunk in (None, 5))
    rng = jax.random.key(4)
    (loss_1, t_1), (loss_5, t_5) = (jax.jit(f)(pretrained(), images, rng) for f in (whole, chunked))
    np.testing.assert_array_equal(t_5, t_1)
    np.testing.assert_allclose(loss_5, loss_1, rtol=1e-5)
    grads = [jax.jit(jax.grad(lambda p, f=f: f(p, images, rng)[0].mean()))(pretrained()) for f in (whole, chunked)]
    np.testing.assert_allclose(flat(grads[1]), flat(grads[0]), rtol=1e-4, atol=1e-7)
    memory = [jax.jit(f).lower(pretrained(), images, rng).compile().memory_analysis().temp_size_in_bytes
              for f in (whole, chunked)]
    assert memory[1] < 0.5 * memory[0], memory
