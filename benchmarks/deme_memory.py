"""Compiled memory of the DeMe training step as `deme finetune` runs it, ahead of time: remat off and on.

    python benchmarks/deme_memory.py church [--replicas 4] [--batch 64] [--microbatches 4] [--dtype float32]
    python benchmarks/deme_memory.py sd15 [--replicas 4] [--batch 8] [--dtype bfloat16] [--lora-rank 64]

The step (``make_replica_step``: interval sampler, student forward and
backward, frozen teacher forward, AdamW, EMA) for ``--replicas`` stacked
replicas (``map_over_replicas``, a device's replicas in one ``lax.map`` loop as
``deme finetune`` runs them, or unrolled: ``--loop unroll``) or for one replica as the
sequential mode trains them, ``--batch`` images per replica in
``--microbatches`` gradient-accumulation steps. Models: ``church``, the
reference's LSUN-Church recipe (google/ddpm-ema-church-256's 113.7M-parameter
UNet at 256x256, 115.3M with channel projections, configs/church_deme.py);
``sd15``, Stable Diffusion 1.5's UNet on 64x64 latents with text states 77x768,
full replicas or rank-r LoRA replicas (adapters on every attention projection,
channel projections in full). It is compiled for this machine's devices from
shapes alone (nothing is allocated), and XLA's memory analysis is the result:
arguments (replica states, the shared teacher, the batch), outputs, temporaries,
and the total without donated buffers counted twice. Results go to
``benchmarks/results/deme_memory-<model>-<platform>.json``. On XLA:CPU per-block
remat changes nothing (XLA:CPU undoes ``jax.checkpoint``; see README, Speed):
the remat-on figures mean something on GPUs and TPUs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.unet_ddim import machine  # noqa: E402

# variant -> (stacked or sequential, LoRA, remat)
VARIANTS = {
    "church": {"stacked_remat_off": ("stacked", False, False), "stacked_remat_on": ("stacked", False, True),
               "sequential_remat_off": ("sequential", False, False),
               "sequential_remat_on": ("sequential", False, True)},
    "sd15": {"full_remat_off": ("stacked", False, False), "lora_remat_off": ("stacked", True, False),
             "full_remat_on": ("stacked", False, True), "lora_remat_on": ("stacked", True, True)},
}
DEFAULTS = {"church": dict(batch=64, microbatches=4, dtype="float32"),
            "sd15": dict(batch=8, microbatches=1, dtype="bfloat16")}


def model_and_batch(name: str, dtype: str, remat: bool, replicas: int, batch: int):
    """The teacher UNet and the shapes of a stacked batch of ``replicas`` x ``batch``."""
    import jax
    import jax.numpy as jnp

    if name == "sd15":
        from deme_jax.interop.unet_condition import SD15_CONFIG, model_from_config

        teacher = model_from_config(SD15_CONFIG)
        batch_spec = {"latents": jax.ShapeDtypeStruct((replicas, batch, 64, 64, 4), jnp.float32),
                      "text": jax.ShapeDtypeStruct((replicas, batch, 77, SD15_CONFIG["cross_attention_dim"]),
                                                   jnp.float32)}
    else:
        from configs import church_ddpm
        from deme_jax.models import UNet2D

        fields = dict(church_ddpm.get_config().model)
        fields.pop("class_name", None)
        teacher = UNet2D(**fields)
        size = teacher.sample_size
        batch_spec = jax.ShapeDtypeStruct((replicas, batch, size, size, teacher.in_channels), jnp.float32)
    return teacher.clone(dtype=jnp.dtype(dtype), remat=remat), batch_spec


def compiled_memory(name: str, mode: str, replicas: int, batch: int, microbatches: int, dtype: str,
                    lora_rank: int, remat: bool, unroll: bool) -> dict:
    import jax
    from flax import traverse_util

    from deme_jax.defaults import deme_config
    from deme_jax.deme.replicas import (
        init_replicas, interval_tasks, make_replica_step, map_over_replicas, replica_slice, task_slice,
        with_identity_projections,
    )
    from deme_jax.diffusion import make_schedule
    from deme_jax.diffusion.timesteps import uniform_partition
    from deme_jax.models import LoRAModel, init_lora, lora_targets, param_shapes
    from deme_jax.train.sharding import make_mesh
    from deme_jax.train.state import make_optimizer

    config = deme_config()
    teacher, batch_spec = model_and_batch(name, dtype, remat, replicas, batch)
    teacher_shapes = param_shapes(teacher)
    student = teacher.clone(channel_projection=True)
    student_shapes = jax.eval_shape(lambda p: with_identity_projections(teacher, p)[1], teacher_shapes)
    if lora_rank:
        adapters = jax.eval_shape(lambda p: init_lora(p, lora_rank, jax.random.key(0), lora_targets(p)),
                                  teacher_shapes)
        pretrained = traverse_util.flatten_dict(teacher_shapes)
        full = traverse_util.unflatten_dict({p: x for p, x in traverse_util.flatten_dict(student_shapes).items()
                                             if p not in pretrained})
        trained, params = LoRAModel(student, 1.0), {"lora": adapters, "full": full}
    else:
        trained, params = student, student_shapes
    schedule = (make_schedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
                if name == "sd15" else make_schedule())
    optimizer = make_optimizer(config.optim)
    step = make_replica_step(trained, teacher, schedule, optimizer, config.ema, uniform_partition(1000, replicas),
                             0.3, 1.0, grad_accum_steps=microbatches, lora=bool(lora_rank))
    state = jax.eval_shape(lambda p, k: init_replicas(p, optimizer, k), params,
                           jax.random.split(jax.random.key(0), replicas))
    tasks = jax.eval_shape(lambda p: interval_tasks(uniform_partition(1000, replicas), p), teacher_shapes)
    if mode == "sequential":
        program = jax.jit(step, donate_argnums=0)
        arguments = jax.eval_shape(lambda *a: (replica_slice(a[0], 0), replica_slice(a[1], 0), task_slice(a[2], 0)),
                                   state, batch_spec, tasks)
    else:
        program = jax.jit(map_over_replicas(step, make_mesh({"replica": 0, "data": -1}, replicas), unroll),
                          donate_argnums=0)
        arguments = (state, batch_spec, tasks)
    start = time.perf_counter()
    memory = program.lower(*arguments).compile().memory_analysis()
    gib = lambda b: b / 2**30  # noqa: E731
    trainable = sum(x.size for x in jax.tree_util.tree_leaves(params))
    return {"trainable_parameters_per_replica": int(trainable), "compile_s": time.perf_counter() - start,
            "arguments_gib": gib(memory.argument_size_in_bytes), "outputs_gib": gib(memory.output_size_in_bytes),
            "temporaries_gib": gib(memory.temp_size_in_bytes), "aliased_gib": gib(memory.alias_size_in_bytes),
            "total_gib": gib(memory.argument_size_in_bytes + memory.output_size_in_bytes
                             + memory.temp_size_in_bytes - memory.alias_size_in_bytes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(VARIANTS))
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--batch", type=int, help="per replica (church 64, sd15 8)")
    parser.add_argument("--microbatches", type=int, help="gradient-accumulation steps (church 4, sd15 1)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute (church float32, sd15 bfloat16)")
    parser.add_argument("--lora-rank", type=int, default=64, help="sd15's LoRA variants")
    parser.add_argument("--loop", choices=("lax_map", "unroll"), default="lax_map",
                        help="stacked replicas on one device: map_over_replicas' loop, or a copy per replica")
    parser.add_argument("--variants", nargs="+", help="which to compile (each takes minutes on a CPU; default: "
                                                      "all of the model's); others already in the results file "
                                                      "with the same settings are kept")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    variants = args.variants or list(VARIANTS[args.model])
    unknown = sorted(set(variants) - set(VARIANTS[args.model]))
    if unknown:
        parser.error(f"{args.model} has no variants {unknown}; it has {list(VARIANTS[args.model])}")

    import jax

    path = args.out / f"deme_memory-{args.model}-{jax.devices()[0].platform}.json"
    settings = {"replicas": args.replicas, "batch_per_replica": args.batch, "microbatches": args.microbatches,
                "dtype": args.dtype, "loop": args.loop, "optimizer": "AdamW (config.optim)",
                "devices": jax.device_count()}
    if args.model == "sd15":
        settings.update(lora_rank=args.lora_rank, lora_targets="attention")
    record = {"benchmark": "deme_memory", "model": args.model, "settings": settings, "machine": machine(),
              "versions": {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib")}, "results": {}}
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier["settings"] == settings:
            record["results"] = earlier["results"]
    args.out.mkdir(parents=True, exist_ok=True)
    for name in variants:
        mode, lora, remat = VARIANTS[args.model][name]
        record["results"][name] = compiled_memory(args.model, mode, args.replicas, args.batch, args.microbatches,
                                                  args.dtype, args.lora_rank if lora else 0, remat,
                                                  args.loop == "unroll")
        print(name, json.dumps(record["results"][name]), flush=True)
        path.write_text(json.dumps(record, indent=2) + "\n")  # after each variant: compiles take minutes
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
