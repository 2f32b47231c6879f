"""N replicas of the pretrained model as one stacked pytree, trained by one jitted step.

Every leaf gets a leading replica axis; replica ``i`` owns timestep interval
``[boundaries[i], boundaries[i + 1])``, its own rng, optimiser state and EMA.
The frozen teacher (the pretrained model, without projections) is shared.
Training one replica at a time (for models too big to stack) runs the same
step on replica ``i``'s slice, so both modes give the same replicas.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deme_jax.deme.intervals import check_global_prob, interval_timesteps
from deme_jax.deme.objective import deme_loss
from deme_jax.diffusion import epsilon_loss
from deme_jax.models import param_shapes
from deme_jax.models.unet import UNet
from deme_jax.train.sharding import replicated
from deme_jax.train.state import create_train_state
from deme_jax.train.step import make_train_step


def with_identity_projections(model: UNet, params: dict) -> tuple[UNet, dict]:
    """The model with channel projections on, the pretrained weights, and identity projections.

    A pretrained model given identity projections computes exactly what it did,
    so task vectors of projections are ``W_i - I``.
    """
    projected = model.clone(channel_projection=True)
    flat = traverse_util.flatten_dict(params)
    for path, shape in traverse_util.flatten_dict(param_shapes(projected)).items():
        if path not in flat:  # a projection kernel (1, 1, C, C)
            flat[path] = jnp.eye(shape.shape[-1], dtype=shape.dtype).reshape(shape.shape)
    return projected, traverse_util.unflatten_dict(flat)


def stack(tree, n: int):
    """``n`` copies of every leaf along a new leading replica axis."""
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)


def replica_slice(tree, i: int):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def interval_tasks(boundaries, teacher_params) -> dict:
    """Per-replica step arguments: interval bounds (one per replica) and the shared teacher."""
    boundaries = np.asarray(boundaries, np.int32)
    return {"low": jnp.asarray(boundaries[:-1]), "high": jnp.asarray(boundaries[1:]), "teacher": teacher_params}


def task_slice(tasks: dict, i: int) -> dict:
    """Replica ``i``'s step arguments: its own bounds, the shared teacher."""
    return {"low": tasks["low"][i], "high": tasks["high"][i], "teacher": tasks["teacher"]}


def replica_shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding, dict]:
    """How stacked replicas lie on ``mesh``: the state (one replica group per device group), the stacked
    batch (replicas, then rows over ``data``), and the tasks (bounds per replica, the teacher everywhere)."""
    per_replica = NamedSharding(mesh, P("replica"))
    tasks = {"low": per_replica, "high": per_replica, "teacher": replicated(mesh)}
    return per_replica, NamedSharding(mesh, P("replica", "data")), tasks


def init_replicas(params: dict, optimizer, rngs: jax.Array):
    """The stacked train state of ``len(rngs)`` replicas that all start from ``params``, each with its own rng."""
    return jax.vmap(lambda rng: create_train_state(params, optimizer, rng))(rngs)


def map_over_replicas(step, mesh: Mesh, unroll: bool = False):
    """``step`` for stacked replicas: every device trains its own replicas, one after another, all in parallel.

    The replica axis is split over the mesh's ``replica`` axis (manual, by
    ``shard_map``); within a device the un-batched step runs once per local
    replica, and the ``data`` axis stays automatic. The local replicas follow
    each other in one ``lax.map`` body, so compile time and activation memory
    are one replica's whatever their number; a single local replica runs
    without the loop. ``unroll`` compiles one copy of the step per replica
    instead, for comparison: on a 2-core CPU with N=8 replicas of the demo's
    UNet, 160.0 against 161.6 replica-images/s mapped, compiled in 180 against
    27 s, 1,045 against 398 MiB (benchmarks/results/replicas-mnist16-*-cpu.json;
    on an H200 the unrolled N=4 step did not compile within 100 s). ``jax.vmap`` would
    batch the convolution kernels into grouped convolutions: 0.8x the
    one-replica throughput on XLA:CPU.
    """

    def local(state, batch, task):
        count = jax.tree_util.tree_leaves(batch)[0].shape[0]
        if count > 1 and not unroll:
            def one(args):
                state, batch, low, high = args
                return step(state, batch, {"low": low, "high": high, "teacher": task["teacher"]})
            return jax.lax.map(one, (state, batch, task["low"], task["high"]))
        outputs = [step(replica_slice(state, i), replica_slice(batch, i), task_slice(task, i)) for i in range(count)]
        return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *outputs)

    replica = P("replica")
    task_specs = {"low": replica, "high": replica, "teacher": P()}
    return jax.shard_map(local, mesh=mesh, in_specs=(replica, replica, task_specs), out_specs=(replica, replica),
                         axis_names={"replica"}, check_vma=False)


def make_replica_step(student: UNet, teacher: UNet, schedule, optimizer, ema_config, report_boundaries,
                      global_prob: float, consistency_weight: float = 1.0, timestep_weight=None, reduce_loss=None,
                      grad_accum_steps: int = 1, lora: bool = False):
    """``step(state, batch, task)`` for ONE replica: interval sampler plus denoising and consistency loss.

    ``map_over_replicas(step, mesh)`` trains stacked replicas. The batch is
    images, or latents and text states for a text-to-image UNet; the teacher
    sees the same noisy input and the same text states as the student.
    ``timestep_weight(t)`` (Min-SNR, P2) scales each example's loss,
    ``reduce_loss`` (ANT-UW) replaces the batch mean; a consistency weight of
    0 skips the teacher (plain finetuning). ``grad_accum_steps``: as in
    ``make_train_step``, the teacher runs on each microbatch. ``lora``: the
    student is a ``LoRAModel`` whose frozen base is the teacher's weights.
    """
    check_global_prob(global_prob)
    T = schedule.num_train_timesteps

    def sample(rng, n, task):
        return interval_timesteps(rng, n, task["low"], task["high"], T, global_prob)

    def loss(prediction, target, x_t, t, conditioning, task):
        if consistency_weight:
            teacher_prediction = teacher.apply({"params": task["teacher"]}, x_t, t, *conditioning)
            per_example = deme_loss(prediction, teacher_prediction, target, consistency_weight)
        else:
            per_example = epsilon_loss(prediction, target)
        return per_example if timestep_weight is None else timestep_weight(t) * per_example

    frozen = (lambda task: {"base": task["teacher"]}) if lora else None
    return make_train_step(student, schedule, optimizer, ema_config, report_boundaries, sample, loss, reduce_loss,
                           grad_accum_steps, frozen)
