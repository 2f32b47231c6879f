"""Compiled memory of the Stable Diffusion 1.5 DeMe step: N stacked replicas, full or LoRA, remat off and on.

    python benchmarks/sd_deme_memory.py [--replicas 4] [--batch 8] [--dtype bfloat16] [--lora-rank 64]

The step `deme finetune` runs for stacked replicas (``make_replica_step`` +
``map_over_replicas``: interval sampler, student forward and backward, frozen
teacher forward, AdamW, EMA) on SD 1.5's UNet with channel projections, 64x64
latents (512x512 images), text states 77x768, ``--batch`` per replica. It is
compiled ahead of time for this machine's devices from shapes alone (nothing
is allocated), and XLA's memory analysis is the result: arguments (replica
states, the shared teacher, the batch), outputs, temporaries, and the total
without donated buffers counted twice. Full replicas train every weight; LoRA
replicas train rank-r adapters on every attention projection plus the channel
projections, over the teacher's weights. Results go to
``benchmarks/results/sd_deme_memory-<platform>.json``. On XLA:CPU per-block
remat changes nothing (XLA:CPU undoes ``jax.checkpoint``; see README, Speed).
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


def compiled_memory(replicas: int, batch: int, dtype: str, lora_rank: int, remat: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from deme_jax.defaults import deme_config
    from deme_jax.deme.replicas import (
        init_replicas, interval_tasks, make_replica_step, map_over_replicas, with_identity_projections,
    )
    from deme_jax.diffusion.timesteps import uniform_partition
    from deme_jax.diffusion import make_schedule
    from deme_jax.interop.unet_condition import SD15_CONFIG, model_from_config
    from deme_jax.models import LoRAModel, init_lora, lora_targets, param_shapes
    from deme_jax.train.sharding import make_mesh
    from deme_jax.train.state import make_optimizer

    config = deme_config()
    teacher = model_from_config(SD15_CONFIG).clone(dtype=jnp.dtype(dtype), remat=remat)
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
    schedule = make_schedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    optimizer = make_optimizer(config.optim)
    boundaries = uniform_partition(1000, 4)
    step = make_replica_step(trained, teacher, schedule, optimizer, config.ema, boundaries, 0.3, 1.0,
                             lora=bool(lora_rank))
    mesh = make_mesh({"replica": 0, "data": -1}, replicas)
    state = jax.eval_shape(lambda p, k: init_replicas(p, optimizer, k), params,
                           jax.random.split(jax.random.key(0), replicas))
    batch_spec = {"latents": jax.ShapeDtypeStruct((replicas, batch, 64, 64, 4), jnp.float32),
                  "text": jax.ShapeDtypeStruct((replicas, batch, 77, SD15_CONFIG["cross_attention_dim"]),
                                               jnp.float32)}
    tasks = jax.eval_shape(lambda p: interval_tasks(uniform_partition(1000, replicas), p), teacher_shapes)
    start = time.perf_counter()
    compiled = jax.jit(map_over_replicas(step, mesh), donate_argnums=0).lower(state, batch_spec, tasks).compile()
    memory = compiled.memory_analysis()
    gib = lambda b: b / 2**30  # noqa: E731
    trainable = sum(x.size for x in jax.tree_util.tree_leaves(params))
    return {"trainable_parameters_per_replica": int(trainable), "compile_s": time.perf_counter() - start,
            "arguments_gib": gib(memory.argument_size_in_bytes), "outputs_gib": gib(memory.output_size_in_bytes),
            "temporaries_gib": gib(memory.temp_size_in_bytes), "aliased_gib": gib(memory.alias_size_in_bytes),
            "total_gib": gib(memory.argument_size_in_bytes + memory.output_size_in_bytes
                             + memory.temp_size_in_bytes - memory.alias_size_in_bytes)}


VARIANTS = {"full_remat_off": ("full", False), "lora_remat_off": ("lora", False), "full_remat_on": ("full", True),
            "lora_remat_on": ("lora", True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="which to compile (each takes minutes on a CPU); others already in the results file "
                             "with the same settings are kept")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    import jax

    path = args.out / f"sd_deme_memory-{jax.devices()[0].platform}.json"
    record = {
        "benchmark": "sd_deme_memory",
        "settings": {"replicas": args.replicas, "batch_per_replica": args.batch, "dtype": args.dtype,
                     "lora_rank": args.lora_rank, "lora_targets": "attention", "latent": "64x64x4",
                     "text_states": "77x768", "model": "Stable Diffusion 1.5 UNet2DConditionModel + channel "
                                                      "projections", "optimizer": "AdamW (config.optim)",
                     "mode": "stacked", "devices": jax.device_count()},
        "machine": machine(),
        "versions": {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib")},
        "results": {},
    }
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier["settings"] == record["settings"]:
            record["results"] = earlier["results"]
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        kind, remat = VARIANTS[name]
        record["results"][name] = compiled_memory(args.replicas, args.batch, args.dtype,
                                                  args.lora_rank if kind == "lora" else 0, remat)
        print(name, json.dumps(record["results"][name]), flush=True)
        path.write_text(json.dumps(record, indent=2) + "\n")  # after each variant: compiles take minutes
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
