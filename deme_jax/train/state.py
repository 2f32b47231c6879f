"""Train state, optimiser and EMA: everything a step needs to continue exactly."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """One pytree: restoring it (and the data stream's step) resumes a run bit for bit."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    ema_params: dict
    rng: jax.Array  # raw uint32 key data, so orbax can store it


def learning_rate_schedule(optim) -> optax.Schedule:
    """``constant`` or ``cosine`` decay to ``lr * final_lr_fraction``, both after a linear warm-up."""
    if optim.schedule == "constant":
        decay = optax.constant_schedule(optim.lr)
    elif optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(optim.lr, max(optim.decay_steps - optim.warmup_steps, 1),
                                            alpha=optim.final_lr_fraction)
    else:
        raise ValueError(f"config.optim.schedule={optim.schedule!r} is not supported; use 'constant' or 'cosine'.")
    if not optim.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, optim.lr, optim.warmup_steps)
    return optax.join_schedules([warmup, decay], [optim.warmup_steps])


def make_optimizer(optim) -> optax.GradientTransformation:
    """AdamW with global-norm gradient clipping, as the PyTorch recipes use it."""
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip else optax.identity(),
        optax.adamw(learning_rate_schedule(optim), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                    weight_decay=optim.weight_decay),
    )


def ema_decay(step: jax.Array, ema) -> jax.Array:
    """Warm-up EMA decay of the update made at 0-based ``step``: min(max, 1 - (1 + step / inv_gamma) ** -power).

    It is 0 at the first update (the EMA starts as the parameters) and rises
    towards ``ema.max_decay``, as diffusers' ``EMAModel`` with ``use_ema_warmup``.
    """
    step = step.astype(jnp.float32)
    return jnp.minimum(ema.max_decay, 1.0 - (1.0 + step / ema.inv_gamma) ** -ema.power)


def ema_update(ema_params: dict, params: dict, decay: jax.Array) -> dict:
    return jax.tree_util.tree_map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)


def create_train_state(params: dict, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params), rng=jax.random.key_data(rng))
