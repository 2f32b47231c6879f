"""Stacked replicas: identity projections, and one stacked step equal to N separate ones."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from deme_jax.deme import uniform_partition
from deme_jax.deme.replicas import (
    init_replicas,
    interval_tasks,
    make_replica_step,
    map_over_replicas,
    replica_slice,
    stack,
    task_slice,
    with_identity_projections,
)
from deme_jax.diffusion import make_schedule
from deme_jax.models import UNet2D, init_params
from deme_jax.train.sharding import make_mesh
from deme_jax.train.state import create_train_state

TEACHER = UNet2D(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 layers_per_block=1, norm_num_groups=8, attention_head_dim=None)


def test_identity_projections_leave_the_pretrained_output_unchanged():
    params = init_params(TEACHER, jax.random.key(0))
    student, student_params = with_identity_projections(TEACHER, params)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
    t = jnp.array([3, 900])
    np.testing.assert_array_equal(student.apply({"params": student_params}, x, t),
                                  TEACHER.apply({"params": params}, x, t))
    kernels = [k for k in jax.tree_util.tree_leaves_with_path(student_params) if "channel_projection" in
               jax.tree_util.keystr(k[0])]
    assert len(kernels) == 2 + 1 + 2  # after each down block, the mid block, each up block


def tiny_replicas(n: int, global_prob: float = 0.0):
    """The smallest UNet's replica step (student and teacher alike), its tasks and ``n`` fresh replicas."""
    tiny = UNet2D(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                  layers_per_block=1, norm_num_groups=4)
    optimizer = optax.adamw(1e-3)
    teacher_params = init_params(tiny, jax.random.key(0))
    ema = ConfigDict(dict(max_decay=0.999, inv_gamma=1.0, power=0.75))
    step = make_replica_step(tiny, tiny, make_schedule(), optimizer, ema, uniform_partition(1000, n), global_prob)
    task = interval_tasks(uniform_partition(1000, n), teacher_params)
    return step, task, init_replicas(teacher_params, optimizer, jax.random.split(jax.random.key(1), n))


@pytest.mark.slow
@pytest.mark.parametrize("unroll", [True, False], ids=["unrolled", "lax_map"])
def test_map_over_replicas_runs_each_replica_with_its_own_slice(unroll):
    """One stacked step on the smallest UNet equals each replica's own step on its own slice, with the local
    replicas in one ``lax.map`` (as ``deme finetune`` runs them) or unrolled."""
    n = 2
    step, task, state = tiny_replicas(n)
    images = jax.random.normal(jax.random.key(2), (n, 4, 8, 8, 1))
    stacked, metrics = jax.jit(map_over_replicas(step, make_mesh({"replica": 0, "data": -1}, n), unroll))(
        state, images, task)
    for i in range(n):
        one, one_metrics = jax.jit(step)(replica_slice(state, i), images[i], task_slice(task, i))
        np.testing.assert_allclose(one_metrics["loss"], metrics["loss"][i], rtol=1e-6)
        np.testing.assert_array_equal(one_metrics["interval_count"], metrics["interval_count"][i])
        # one program for both replicas may fuse differently: float rounding, which Adam's first step (about
        # lr * sign(g)) turns into lr-sized moves where a gradient is zero in theory; the vector as a whole agrees
        flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])  # noqa: E731
        ours, expected = flat(one.params), flat(replica_slice(stacked, i).params)
        assert np.linalg.norm(ours - expected) / np.linalg.norm(expected) < 1e-5
    # each replica drew timesteps only from its own interval, so the two losses differ
    np.testing.assert_array_equal(metrics["interval_count"], np.eye(n) * 4)
    assert metrics["loss"][0] != metrics["loss"][1]


MAPPED_ON_A_MESH = """
import json, jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from deme_jax.deme.replicas import map_over_replicas
from deme_jax.train.sharding import make_mesh, replicated
from tests.test_replicas import tiny_replicas

n = 4
mesh = make_mesh({"replica": 2, "data": 4}, n)
per_replica, rows = NamedSharding(mesh, P("replica")), NamedSharding(mesh, P("replica", "data"))
images = jax.device_put(jax.random.normal(jax.random.key(2), (n, 8, 8, 8, 1)), rows)
results = []
for unroll in (True, False):
    step, task, state = tiny_replicas(n, global_prob=0.3)
    task = jax.device_put(task, {"low": per_replica, "high": per_replica, "teacher": replicated(mesh)})
    state = jax.device_put(state, per_replica)
    train = jax.jit(map_over_replicas(step, mesh, unroll))
    for _ in range(2):
        state, metrics = train(state, images, task)
    results.append((np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(state.params)]),
                    np.asarray(metrics["loss"])))
(a, loss_a), (b, loss_b) = results
print(json.dumps({"rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
                  "loss_diff": float(np.abs(loss_a - loss_b).max()), "loss_spread": float(np.ptp(loss_a))}))
"""


@pytest.mark.slow
def test_lax_map_over_a_meshs_replicas_trains_what_the_unrolled_loop_trains():
    """The loop with two replicas per device and each replica's batch split over the ``data`` axis (8
    forced CPU devices as replica=2 x data=4), two steps: the same replicas as the unrolled loop, to float rounding
    (which Adam's first steps turn into lr-sized moves where a gradient is zero in theory)."""
    proc = subprocess.run([sys.executable, "-c", MAPPED_ON_A_MESH], cwd=Path(__file__).parents[1],
                          env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rel_l2"] < 1e-4 and result["loss_diff"] < 1e-5, result
    assert result["loss_spread"] > 1e-3, result  # the four replicas did see different timesteps


@pytest.mark.slow  # the same property through `deme finetune` runs by default in test_finetune.py
def test_stacked_replicas_equal_replicas_trained_one_at_a_time():
    n, batch, steps = 2, 4, 3
    schedule = make_schedule()
    teacher_params = init_params(TEACHER, jax.random.key(0))
    student, params = with_identity_projections(TEACHER, teacher_params)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    ema = ConfigDict(dict(max_decay=0.999, inv_gamma=1.0, power=0.75))
    step = make_replica_step(student, TEACHER, schedule, optimizer, ema, uniform_partition(1000, n),
                             global_prob=0.0)
    task = interval_tasks(uniform_partition(1000, n), teacher_params)

    state = stack(create_train_state(params, optimizer, jax.random.key(2)), n)
    state = state.replace(rng=jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(jax.random.key(2), i)))(
        jnp.arange(n)))
    images = jax.random.normal(jax.random.key(3), (steps, n, batch, 16, 16, 1))

    stacked_step = jax.jit(map_over_replicas(step, make_mesh({"replica": 0, "data": -1}, n)))
    stacked, stacked_losses = state, []
    for k in range(steps):
        stacked, metrics = stacked_step(stacked, images[k], task)
        stacked_losses.append(metrics["loss"])
        # with global_prob 0 every timestep falls in the replica's own interval
        np.testing.assert_array_equal(metrics["interval_count"], np.eye(n) * batch)

    single_step = jax.jit(step)
    for i in range(n):
        one = replica_slice(state, i)
        one_task = {"low": task["low"][i], "high": task["high"][i], "teacher": teacher_params}
        for k in range(steps):
            one, metrics = single_step(one, images[k, i], one_task)
            np.testing.assert_allclose(metrics["loss"], stacked_losses[k][i], rtol=1e-5)
        # One jitted program for both replicas may fuse differently: float rounding only. Attention key biases
        # have an exactly-zero gradient in theory, which Adam turns into lr-sized noise; the whole vector agrees.
        flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])
        ours, expected = flat(one.params), flat(replica_slice(stacked, i).params)
        assert np.linalg.norm(ours - expected) / np.linalg.norm(expected) < 1e-5
    # the replicas did move, and apart from each other, by far more than the agreement tolerance
    start, a, b = flat(params), *(flat(replica_slice(stacked, i).params) for i in range(2))
    for moved in (a - start, b - start, a - b):
        assert np.linalg.norm(moved) / np.linalg.norm(start) > 1e-3


@pytest.mark.slow
def test_timestep_weighting_scales_each_example_and_zero_consistency_drops_the_teacher():
    from configs import deme as deme_config
    from deme_jax.deme.finetune import timestep_weight
    from deme_jax.diffusion import min_snr_weight, p2_weight

    schedule = make_schedule()
    params = init_params(TEACHER, jax.random.key(0))
    optimizer = optax.sgd(0.0)
    ema = ConfigDict(dict(max_decay=0.999, inv_gamma=1.0, power=0.75))
    student = jax.tree_util.tree_map(lambda p: 1.05 * p, params)  # the student has moved off the teacher
    teachers = {"teacher": params, "nan": jax.tree_util.tree_map(lambda p: jnp.full_like(p, jnp.nan), params)}
    state = create_train_state(student, optimizer, jax.random.key(1))
    images = jax.random.normal(jax.random.key(2), (4, 16, 16, 1))
    losses = {}
    for name, weight, consistency, teacher in (
            ("plain", None, 0.0, "teacher"), ("doubled", lambda t: 2.0 * jnp.ones(t.shape), 0.0, "teacher"),
            ("consistency", None, 1.0, "teacher"), ("plain_nan_teacher", None, 0.0, "nan"),
            ("consistency_nan_teacher", None, 1.0, "nan")):
        step = make_replica_step(TEACHER, TEACHER, schedule, optimizer, ema, uniform_partition(1000, 1), 0.0,
                                 consistency, weight)
        task = {"low": jnp.int32(0), "high": jnp.int32(1000), "teacher": teachers[teacher]}
        losses[name] = float(jax.jit(step)(state, images, task)[1]["loss"])
    assert losses["doubled"] == pytest.approx(2 * losses["plain"], rel=1e-6)
    assert losses["consistency"] - losses["plain"] > 1e-3  # mean((student - teacher)^2) is added
    # weight 0 never runs the teacher (a NaN teacher changes nothing); weight 1 does
    assert losses["plain_nan_teacher"] == losses["plain"] and np.isnan(losses["consistency_nan_teacher"])

    config = deme_config.get_config()
    t = jnp.array([0, 10, 500, 999])
    assert timestep_weight(config, schedule) is None
    config.deme.update(dict(weighting="min_snr", min_snr_gamma=2.0))
    np.testing.assert_array_equal(timestep_weight(config, schedule)(t), min_snr_weight(schedule, t, 2.0))
    config.deme.update(dict(weighting="p2", p2_gamma=0.5, p2_k=2.0))
    np.testing.assert_array_equal(timestep_weight(config, schedule)(t), p2_weight(schedule, t, 0.5, 2.0))
