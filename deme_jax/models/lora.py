"""LoRA as a transformation of a parameter tree: rank-r adapters on chosen kernels, folded into dense weights.

The adapter of a kernel ``W`` (``(in, out)`` for a linear layer, HWIO ``(kh, kw, in, out)`` for a convolution)
is two layers, as in peft: ``lora_A``, a kernel of ``W``'s shape with ``r`` outputs, and ``lora_B``, an
``r -> out`` kernel (a 1x1 convolution for a convolution). ``apply_lora`` returns the dense tree with
``W + scale * A @ B`` in place of each adapted kernel (for a convolution, ``A``'s convolution followed by
``B``'s 1x1 one, which is peft's conv LoRA), so a model's ``apply`` is unchanged and a step differentiated in
the adapters trains only them. ``scale`` is peft's ``lora_alpha / r``; it is an argument rather than a leaf,
so an optimiser of the adapter tree sees only ``A`` and ``B``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

GROUPS = ("attention", "convolution", "projection")
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out_0")


def _group(module: tuple[str, ...], kernel) -> str | None:
    """Which of ``GROUPS`` the kernel of ``module`` belongs to, if any."""
    if module[-1] in ATTENTION_PROJECTIONS:
        return "attention"
    if module[-1] == "channel_projection":
        return "projection"
    return "convolution" if len(kernel.shape) == 4 else None


def lora_targets(params, include=("attention",)) -> tuple[tuple[str, ...], ...]:
    """The modules whose kernels LoRA adapts, as key paths into ``params`` (``("mid_block", ..., "to_q")``).

    ``include`` picks from ``GROUPS``: ``attention``, the q/k/v/out projections of every attention layer
    (a UNet2DCondition's self- and cross-attention, a UNet2D's attention blocks); ``convolution``, every
    convolution (3x3 and 1x1, DeMe's projections aside); ``projection``, DeMe's channel projections.
    """
    include = (include,) if isinstance(include, str) else tuple(include)
    unknown = [g for g in include if g not in GROUPS]
    if unknown:
        raise ValueError(f"include={include!r} names unknown groups {unknown}; choose from {GROUPS}.")
    flat = traverse_util.flatten_dict(params)
    targets = tuple(p[:-1] for p, x in flat.items() if p[-1] == "kernel" and _group(p[:-1], x) in include)
    if not targets:
        raise ValueError(f"include={include!r} selects no kernel of this model; choose groups it has from {GROUPS} "
                         "(projection needs a model built with channel_projection=True).")
    return targets


def init_lora(params, rank: int, rng: jax.Array, targets=None) -> dict:
    """Adapters for ``targets`` (default: ``lora_targets(params)``) as peft initialises them: ``lora_A``
    uniform in +-1/sqrt(fan_in) (kaiming_uniform with a=sqrt(5)), ``lora_B`` zero, so that ``apply_lora``
    starts exactly at ``params``. A tree of ``{module path: {"lora_A": {"kernel"}, "lora_B": {"kernel"}}}``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r}: the LoRA rank must be a positive integer (4 to 64 is usual).")
    targets = lora_targets(params) if targets is None else [tuple(t) for t in targets]
    flat = traverse_util.flatten_dict(params)
    unknown = [".".join(t) for t in targets if t + ("kernel",) not in flat]
    if unknown or not targets:
        raise ValueError(f"targets {unknown[:3] or '(none)'} name no kernel of the model; take targets from "
                         f"lora_targets(params, include=...), which chooses among {GROUPS}.")
    shapes = {t: flat[t + ("kernel",)].shape for t in targets}
    limits = {t: min(math.prod(s[:-1]), s[-1]) for t, s in shapes.items()}
    smallest = min(limits, key=limits.get)
    if rank > limits[smallest]:
        raise ValueError(f"rank={rank} exceeds the kernel {'.'.join(smallest)} of shape {shapes[smallest]}: "
                         f"an adapter of a kernel with {math.prod(shapes[smallest][:-1])} inputs and "
                         f"{shapes[smallest][-1]} outputs has rank at most {limits[smallest]}. Use "
                         f"rank <= {limits[smallest]} or leave that kernel out of targets.")
    # One draw for every lora_A: drawn one by one, each new shape would compile its own program.
    fan_ins = [math.prod(s[:-1]) for s in shapes.values()]
    sizes = [n * rank for n in fan_ins]
    bounds = np.repeat(1.0 / np.sqrt(fan_ins), sizes).astype(np.float32)
    draws = jax.random.uniform(rng, bounds.shape, jnp.float32, -1.0, 1.0) * bounds
    adapters = {}
    for a, (module, shape) in zip(jnp.split(draws, np.cumsum(sizes)[:-1]), shapes.items()):
        adapters[module + ("lora_A", "kernel")] = a.reshape(shape[:-1] + (rank,))
        adapters[module + ("lora_B", "kernel")] = jnp.zeros((1,) * (len(shape) - 2) + (rank, shape[-1]),
                                                            jnp.float32)
    return traverse_util.unflatten_dict(adapters)


def _deltas(base, lora_params, scale) -> dict:
    """``{kernel path: scale * A @ B}`` for every adapted kernel, each checked against base's kernel."""
    kernels = traverse_util.flatten_dict(base)
    flat = traverse_util.flatten_dict(lora_params)
    deltas = {}
    for module in sorted({p[:-2] for p in flat}):
        kernel = kernels.get(module + ("kernel",))
        a, b = flat.get(module + ("lora_A", "kernel")), flat.get(module + ("lora_B", "kernel"))
        if (kernel is None or a is None or b is None or a.shape[:-1] != kernel.shape[:-1]
                or b.shape[-1] != kernel.shape[-1]):
            raise ValueError(f"lora_params[{'.'.join(module)}] does not adapt a kernel of this model (kernel "
                             f"{None if kernel is None else kernel.shape}, lora_A {None if a is None else a.shape}, "
                             f"lora_B {None if b is None else b.shape}): adapters fit the model that init_lora made "
                             "them for.")
        # HIGHEST: a GPU's default float32 matmul (TF32) would round the task vector to 10 bits.
        deltas[module + ("kernel",)] = scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    return deltas


def apply_lora(base, lora_params, scale) -> dict:
    """``base`` with ``W + scale * A @ B`` for every adapted kernel (in W's dtype); other leaves are base's own."""
    deltas = _deltas(base, lora_params, scale)
    flat = traverse_util.flatten_dict(base)
    return traverse_util.unflatten_dict(
        {p: (x + deltas[p]).astype(x.dtype) if p in deltas else x for p, x in flat.items()})


def dense_delta(base, lora_params, scale) -> dict:
    """The task vector of a LoRA replica, ``apply_lora(base, ...) - base`` without that subtraction's rounding:
    ``scale * A @ B`` at adapted kernels, zeros elsewhere, in base's structure and dtypes.

    Dense because it is the tree the merges compute (to that rounding) from the replicas ``apply_lora`` makes,
    ``merge(base, [apply_lora(base, l, scale) for l in adapters], weights)``: TIES' top-k and sign election
    over the whole model, DARE's key per leaf and per-block weights treat a LoRA replica as any other.
    """
    deltas = _deltas(base, lora_params, scale)
    flat = traverse_util.flatten_dict(base)
    return traverse_util.unflatten_dict(
        {p: deltas[p].astype(x.dtype) if p in deltas else jnp.zeros(x.shape, x.dtype) for p, x in flat.items()})


@dataclasses.dataclass(frozen=True, eq=False)
class LoRAModel:
    """``model`` trained through LoRA: its trainable tree is ``{"lora": adapters, "full": leaves trained in full}``
    (``full``: e.g. DeMe's channel projections, small and new) over frozen ``base`` weights.

    ``apply({"params": trainable, "base": base}, ...)`` is ``model.apply`` of ``dense(trainable, base)``; without
    a ``"base"`` collection the bound ``base`` serves (evaluation and sampling). Compared by identity, so it can
    be a static argument of a jitted function like a Flax module.
    """

    model: nn.Module
    scale: float
    base: dict | None = None

    def dense(self, trainable: dict, base: dict) -> dict:
        """The dense parameters: ``base`` with the ``full`` leaves put in and every adapter folded in."""
        flat = {**traverse_util.flatten_dict(base), **traverse_util.flatten_dict(trainable["full"])}
        return apply_lora(traverse_util.unflatten_dict(flat), trainable["lora"], self.scale)

    def apply(self, variables, *args, **kwargs):
        base = variables.get("base", self.base)
        return self.model.apply({"params": self.dense(variables["params"], base)}, *args, **kwargs)


def merged_adapters(stacked_lora: dict, weights, groups: tuple[str, ...] = ()) -> dict:
    """One adapter set equal to task arithmetic over N replicas' adapters: ``sum_i w_i scale A_i B_i`` is
    ``scale * [A_1 .. A_N] [w_1 B_1; ..; w_N B_N]``, rank N r, exactly.

    ``stacked_lora``: adapters with a leading replica axis. ``weights``: (N,), or (N, G) per replica and
    top-level entry of the model (``groups``, in ``merge.weight_groups`` order).
    """
    weights = jnp.asarray(weights, jnp.float32)
    column = {name: g for g, name in enumerate(groups)}
    merged = {}
    for path, x in traverse_util.flatten_dict(stacked_lora).items():
        if path[-2] == "lora_A":  # (N, ..., in, r) -> (..., in, N r)
            merged[path] = jnp.concatenate(list(x), axis=-1)
        else:  # (N, ..., r, out) -> (..., N r, out), replica i's rows scaled by its weight
            w = weights if weights.ndim == 1 else weights[:, column[path[0]]]
            merged[path] = jnp.concatenate([w[i] * x[i] for i in range(x.shape[0])], axis=-2)
    return traverse_util.unflatten_dict(merged)
