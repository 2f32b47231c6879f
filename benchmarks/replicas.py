"""N stacked DeMe replicas against one: per-replica training throughput, compile time and memory as N grows.

    python benchmarks/replicas.py [--model mnist16|cifar10] [--batch 32] [--replicas 1 2 4 8] [--steps 10]
        [--rounds 5] [--impl lax_map|unroll|vmap]

One DeMe training step (interval sampler, student forward and backward, frozen
teacher forward for the consistency loss, AdamW, EMA) for N replicas stacked in
one jitted call, on the devices there are (the replica axis sharded over them
as `deme finetune` does). Throughput counts replica-images: N * batch per step,
so N=4 at 1.0x trains four replicas as fast as four one-replica runs back to
back; the target is >= 0.95x the N=1 run. Memory is
XLA's compiled footprint (arguments + outputs + temporaries - aliased). The
same step in PyTorch (diffusers' UNet2DModel, eager, AdamW) gives the reference's
one-replica throughput on the same machine. Each N runs ``--rounds`` rounds of
``--steps`` steps, alternating with rounds of the PyTorch step, and reports
medians: on a shared machine whose speed drifts by tens of percent between
minutes, both sides then see the same drift. Results go to
``benchmarks/results/replicas-<model>-<impl>-<platform>.json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.unet_ddim import convolution_seconds, forward_convolutions, machine  # noqa: E402
from deme_jax.xla_cpu import use_all_cores_for_convolutions  # noqa: E402

MODELS = {
    "mnist16": dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                    norm_num_groups=8),
    "cifar10": "DDPM_CIFAR10_CONFIG",
}


def diffusers_fields(model_fields) -> dict:
    """The UNet's fields as diffusers' UNet2DModel takes them (lists for tuples)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in model_fields.items()}


def jax_stepper(model_fields, n: int, batch: int, impl: str):
    """Compiles N stacked replicas' step; returns ``run(steps) -> (seconds per step, loss)``, compile seconds and
    compiled memory."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from ml_collections import ConfigDict

    from deme_jax.diffusion.timesteps import uniform_partition
    from deme_jax.deme.replicas import make_replica_step, map_over_replicas, with_identity_projections
    from deme_jax.diffusion import make_schedule
    from deme_jax.models import UNet2D, init_params
    from deme_jax.train.sharding import make_mesh
    from deme_jax.train.state import create_train_state, make_optimizer
    from jax.sharding import NamedSharding, PartitionSpec as P

    teacher = UNet2D(**model_fields)
    teacher_params = init_params(teacher, jax.random.key(0))
    student, params = with_identity_projections(teacher, teacher_params)
    optim = ConfigDict(dict(lr=5e-5, schedule="constant", warmup_steps=0, decay_steps=1, final_lr_fraction=0.0,
                            b1=0.95, b2=0.999, eps=1e-8, weight_decay=1e-6, grad_clip=1.0))
    optimizer = make_optimizer(optim)
    ema = ConfigDict(dict(max_decay=0.9999, inv_gamma=1.0, power=0.75))
    step = make_replica_step(student, teacher, make_schedule(), optimizer, ema, uniform_partition(1000, 4),
                             global_prob=0.3)
    mesh = make_mesh({"replica": 0, "data": -1}, n)
    per_replica, data = NamedSharding(mesh, P("replica")), NamedSharding(mesh, P("replica", "data"))
    bounds = uniform_partition(1000, n)
    task = {"low": jax.device_put(np.asarray(bounds[:-1], np.int32), per_replica),
            "high": jax.device_put(np.asarray(bounds[1:], np.int32), per_replica),
            "teacher": jax.device_put(teacher_params, NamedSharding(mesh, P()))}
    init = jax.jit(jax.vmap(lambda r: create_train_state(params, optimizer, r)),
                   out_shardings=per_replica)
    state = init(jax.random.split(jax.random.key(1), n))
    size = model_fields["sample_size"]
    images = jax.device_put(np.random.default_rng(0).uniform(-1, 1, (n, batch, size, size,
                                                                      model_fields["in_channels"])).astype(np.float32),
                            data)
    if impl == "vmap":  # for comparison: kernels batched into grouped convolutions
        stacked = jax.vmap(step, in_axes=(0, 0, {"low": 0, "high": 0, "teacher": None}))
    else:
        stacked = map_over_replicas(step, mesh, unroll=impl == "unroll")
    train = jax.jit(stacked, donate_argnums=0)
    start = time.perf_counter()
    compiled = train.lower(state, images, task).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    footprint = None
    if memory is not None:
        footprint = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                     - memory.alias_size_in_bytes)
    state, metrics = compiled(state, images, task)  # warm-up
    jax.block_until_ready(metrics)

    def run(steps: int):
        nonlocal state
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, images, task)
        jax.block_until_ready(metrics)
        return (time.perf_counter() - start) / steps, float(np.mean(jnp.asarray(metrics["loss"])))

    return run, compile_s, footprint


def torch_stepper(model_fields, batch: int):
    """One replica of the reference: diffusers UNet2DModel (no projections), consistency loss to a frozen copy,
    AdamW with clipping; the interval sampler and EMA are left out (they cost next to nothing). Returns
    ``run(steps) -> seconds per step``."""
    import copy

    import torch
    from diffusers import UNet2DModel

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    fields = diffusers_fields(model_fields)
    student = UNet2DModel(**fields).train()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-5, betas=(0.95, 0.999), weight_decay=1e-6)
    size, channels = fields["sample_size"], fields["in_channels"]
    x0 = torch.rand(batch, channels, size, size) * 2 - 1
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)

    def one_step():
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        eps = student(x_t, t).sample
        with torch.no_grad():
            target = teacher(x_t, t).sample
        loss = torch.nn.functional.mse_loss(eps, noise) + torch.nn.functional.mse_loss(eps, target)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            one_step()
        return (time.perf_counter() - start) / steps

    one_step()
    return run


def model_phases(model_fields, batch: int, rounds: int) -> dict:
    """Where a step's time goes: the UNet's forward, and forward plus backward of a mean-square loss, in JAX
    (jitted) and PyTorch (eager, training mode), alternating, medians of ``rounds`` calls (milliseconds); and the
    same for the forward's convolutions alone, one at a time, summed."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import UNet2DModel

    from deme_jax.models import UNet2D, init_params

    model = UNet2D(**model_fields)
    params = init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    size, channels = model_fields["sample_size"], model_fields["in_channels"]
    x = rng.standard_normal((batch, size, size, channels)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    xj, tj = jnp.asarray(x), jnp.asarray(t, jnp.int32)
    forward = jax.jit(lambda p: model.apply({"params": p}, xj, tj))
    backward = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, xj, tj) ** 2)))
    reference = UNet2DModel(**diffusers_fields(model_fields)).train()
    xt, tt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(t)

    def torch_forward():
        with torch.no_grad():
            reference(xt, tt)

    def torch_backward():
        reference.zero_grad()
        (reference(xt, tt).sample ** 2).mean().backward()

    calls = {"forward_jax": lambda: jax.block_until_ready(forward(params)), "forward_torch": torch_forward,
             "forward_backward_jax": lambda: jax.block_until_ready(backward(params)),
             "forward_backward_torch": torch_backward}
    times = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    phases = {f"{name}_ms": statistics.median(ts) * 1e3 for name, ts in times.items()}
    convolutions = forward_convolutions(model.apply, {"params": params}, xj, tj)
    for pass_, with_gradients in (("forward", False), ("forward_backward", True)):
        seconds = convolution_seconds(convolutions, rounds, with_gradients)
        phases.update({f"{pass_}_convolutions_{side}_ms": s * 1e3 for side, s in seconds.items()})
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="mnist16")
    parser.add_argument("--batch", type=int, default=32, help="per replica")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=10, help="per round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per N, alternating with PyTorch's")
    parser.add_argument("--impl", choices=("lax_map", "unroll", "vmap"), default="lax_map",
                        help="how a device's stacked replicas run: deme finetune's map_over_replicas (one lax.map "
                             "body), map_over_replicas(unroll=True) (a copy of the step per replica), or jax.vmap")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    flag = use_all_cores_for_convolutions()

    import jax

    from deme_jax.interop import model_from_config
    from deme_jax.interop.unet import DDPM_CIFAR10_CONFIG

    fields = MODELS[args.model]
    if fields == "DDPM_CIFAR10_CONFIG":
        model = model_from_config(DDPM_CIFAR10_CONFIG)
        fields = {k: getattr(model, k) for k in ("sample_size", "in_channels", "out_channels", "block_out_channels",
                                                  "down_block_types", "up_block_types", "layers_per_block",
                                                  "norm_num_groups", "downsample_padding", "flip_sin_to_cos",
                                                  "freq_shift", "norm_eps", "attention_head_dim")}
    torch_run = None if args.no_torch else torch_stepper(fields, args.batch)
    rows, torch_seconds = [], []
    for n in args.replicas:
        run, compile_s, footprint = jax_stepper(fields, n, args.batch, args.impl)
        seconds, round_torch = [], []
        for _ in range(args.rounds):
            step_s, loss = run(args.steps)
            seconds.append(step_s)
            if torch_run is not None:
                round_torch.append(torch_run(args.steps))
        step_s = statistics.median(seconds)
        row = {"replicas": n, "step_s": step_s, "step_s_rounds": seconds,
               "replica_images_per_s": n * args.batch / step_s, "compile_s": compile_s,
               "compiled_memory_bytes": footprint, "loss": loss}
        if round_torch:
            torch_seconds += round_torch
            # Per-round ratios, each against the PyTorch round run next to it.
            row["vs_torch_one_replica"] = statistics.median(t * n / s for t, s in zip(round_torch, seconds))
        rows.append(row)
        print(f"N={n}: {step_s:.3f} s/step, {n * args.batch / step_s:.1f} replica-images/s, compiled in "
              f"{compile_s:.1f} s, memory {footprint / 2 ** 20 if footprint else float('nan'):.0f} MiB"
              + (f", {row['vs_torch_one_replica']:.2f}x PyTorch's one replica" if round_torch else ""), flush=True)
    for row in rows:
        row["throughput_vs_n1"] = row["replica_images_per_s"] / rows[0]["replica_images_per_s"]
        row["compile_vs_n1"] = row["compile_s"] / rows[0]["compile_s"]
    record = {
        "benchmark": "replicas",
        "settings": {"model": args.model, "batch_per_replica": args.batch, "steps_per_round": args.steps,
                     "rounds": args.rounds, "impl": args.impl},
        "machine": machine(),
        "versions": {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib")},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_cpu_convolution_flag": flag,
        "jax": rows,
    }
    if not args.no_torch:
        record["phases"] = model_phases(fields, args.batch, 5 * args.rounds)
        print("one replica's UNet (ms): " + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in record["phases"].items()),
              flush=True)
    if torch_seconds:
        import torch

        seconds = statistics.median(torch_seconds)
        record["torch_one_replica"] = {"step_s": seconds, "step_s_rounds": torch_seconds,
                                       "images_per_s": args.batch / seconds}
        record["versions"]["torch"] = torch.__version__
        record["versions"]["diffusers"] = importlib.metadata.version("diffusers")
        print(f"PyTorch one replica: {seconds:.3f} s/step, {args.batch / seconds:.1f} images/s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"replicas-{args.model}-{args.impl}-{jax.devices()[0].platform}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
