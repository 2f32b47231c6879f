"""UNet forward and a whole DDIM run of the CIFAR-10 DDPM: deme-jax against diffusers, same machine, same run.

    python benchmarks/unet_ddim.py [--batch 64] [--steps 100] [--repeats 3] [--no-xla-cpu-flag]

Both sides get the same random weights (diffusers' init, saved and loaded with
load_diffusers_unet). PyTorch runs eager under ``torch.no_grad`` with as many
threads as cores; JAX runs one jitted call (the forward) and one compiled
``lax.scan`` (the DDIM run), timed after a warm-up call that compiles. The
forward's convolutions are also timed one by one on both sides (same shapes,
each the median of a few calls; ours also as XLA's direct convolution): their
sum bounds what any forward can reach while the convolutions run at that
speed. Results go to ``benchmarks/results/unet_ddim-<platform>.json`` with the
machine and versions.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deme_jax.xla_cpu import use_all_cores_for_convolutions  # noqa: E402


def call_times(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def best_of(fn, repeats: int) -> float:
    return min(call_times(fn, repeats))


def median_time(fn, repeats: int) -> float:
    return statistics.median(call_times(fn, repeats))


def forward_convolutions(apply, *args) -> collections.Counter:
    """(input shape, kernel shape, strides, padding) -> count, for every ``nn.Conv`` that ``apply(*args)`` calls."""
    import jax
    from flax import linen as nn

    found = collections.Counter()

    def record(call, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.Conv) and context.method_name == "__call__":
            x = args[0]
            window = tuple(module.kernel_size)
            strides = (module.strides,) * 2 if isinstance(module.strides, int) else tuple(module.strides)
            padding = module.padding
            if isinstance(padding, str):
                padding = jax.lax.padtype_to_pads(x.shape[1:3], window, strides, padding)
            found[(x.shape, (*window, x.shape[-1], module.features), strides, tuple(map(tuple, padding)))] += 1
        return call(*args, **kwargs)

    with nn.intercept_methods(record):  # traced afresh: a jitted ``apply`` would hit JAX's trace cache
        jax.eval_shape(lambda *args: apply(*args), *args)
    return found


def convolution_seconds(convolutions: collections.Counter, repeats: int, backward: bool = False) -> dict:
    """The forward's convolutions timed one at a time: as the models run them (``conv_nhwc``: Winograd's where it
    pays on CPUs), as XLA's direct convolution, NHWC, and in PyTorch, NCHW (as the UNets run them);
    ``backward``: each with the gradients of its input and kernel as well."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from deme_jax.models.layers import conv_nhwc

    totals = {"jax": 0.0, "jax_direct": 0.0, "torch": 0.0}
    rng = np.random.default_rng(0)
    for (x_shape, w_shape, strides, padding), count in convolutions.items():
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(w_shape).astype(np.float32)
        xj, wj = jax.device_put(x), jax.device_put(w)
        direct = lambda x, w, strides=strides, padding=padding: jax.lax.conv_general_dilated(
            x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        ours = lambda x, w, strides=strides, padding=padding: conv_nhwc(x, w, strides, padding)
        for name, conv in (("jax", ours), ("jax_direct", direct)):
            if backward:
                conv = jax.grad(lambda x, w, conv=conv: jnp.sum(conv(x, w) ** 2), (0, 1))
            conv = jax.jit(conv)
            jax.block_until_ready(conv(xj, wj))
            totals[name] += count * median_time(lambda: jax.block_until_ready(conv(xj, wj)), repeats)
        xt, wt = (torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(backward),
                  torch.from_numpy(w).permute(3, 2, 0, 1).contiguous().requires_grad_(backward))
        (top, bottom), (left, right) = padding
        if (top, left) == (bottom, right):
            torch_conv = lambda: torch.nn.functional.conv2d(xt, wt, stride=strides, padding=(top, left))
        else:  # diffusers' Downsample2D pads (0, 1) by hand, then convolves
            torch_conv = lambda: torch.nn.functional.conv2d(
                torch.nn.functional.pad(xt, (left, right, top, bottom)), wt, stride=strides)
        if backward:
            torch_call = lambda conv=torch_conv: torch.autograd.grad((conv() ** 2).sum(), (xt, wt))
        else:
            torch_call = torch.no_grad()(torch_conv)
        torch_call()
        totals["torch"] += count * median_time(torch_call, repeats)
    return totals


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict:
    """The host, CPU, cores, JAX devices and Python a result was measured with."""
    import jax

    return {"host": platform.node(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "jax_devices": [str(d) for d in jax.devices()], "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-xla-cpu-flag", action="store_true", help="leave XLA:CPU's convolution path as is")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    flag = False if args.no_xla_cpu_flag else use_all_cores_for_convolutions()

    import diffusers
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import DDIMPipeline, DDPMScheduler, UNet2DModel

    from deme_jax.diffusion import ddim_sample
    from deme_jax.interop import load_diffusers_scheduler, load_diffusers_unet
    from deme_jax.interop.unet import DDPM_CIFAR10_CONFIG

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    unet = UNet2DModel(**DDPM_CIFAR10_CONFIG).eval()
    pipeline = DDIMPipeline(unet, DDPMScheduler(clip_sample=True, variance_type="fixed_large"))
    pipeline.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline.save_pretrained(tmp)
        model, params = load_diffusers_unet(tmp)
        schedule = load_diffusers_scheduler(tmp)

    b = args.batch
    x = np.random.default_rng(0).standard_normal((b, 32, 32, 3)).astype(np.float32)
    t = np.full((b,), 500, np.int64)
    x_torch, t_torch = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(t)
    results = {}

    def torch_forward():
        with torch.no_grad():
            unet(x_torch, t_torch)

    torch_forward()
    results["forward_torch_s"] = best_of(torch_forward, args.repeats)

    apply = jax.jit(model.apply)
    xj, tj = jnp.asarray(x), jnp.asarray(t, jnp.int32)
    start = time.perf_counter()
    apply({"params": params}, xj, tj).block_until_ready()
    results["forward_jax_compile_s"] = time.perf_counter() - start
    results["forward_jax_s"] = best_of(lambda: apply({"params": params}, xj, tj).block_until_ready(), args.repeats)
    print(f"forward batch {b}: torch {results['forward_torch_s']:.3f} s, jax {results['forward_jax_s']:.3f} s",
          flush=True)
    convolutions = forward_convolutions(model.apply, {"params": params}, xj, tj)
    conv_s = convolution_seconds(convolutions, max(args.repeats, 5))
    results["forward_convolutions"] = sum(convolutions.values())
    results["forward_convolutions_jax_s"] = conv_s["jax"]
    results["forward_convolutions_jax_direct_s"] = conv_s["jax_direct"]
    results["forward_convolutions_torch_s"] = conv_s["torch"]
    # The best forward with our convolutions and nothing else, against PyTorch's whole forward.
    results["forward_speedup_bound"] = results["forward_torch_s"] / conv_s["jax"]
    print(f"the forward's {sum(convolutions.values())} convolutions one by one: torch {conv_s['torch']:.3f} s, "
          f"jax {conv_s['jax']:.3f} s (XLA's direct convolutions {conv_s['jax_direct']:.3f} s)", flush=True)

    generator = torch.Generator().manual_seed(0)
    results["ddim_torch_s"] = best_of(
        lambda: pipeline(batch_size=b, generator=generator, num_inference_steps=args.steps, output_type="np"), 1)
    noise = jax.random.normal(jax.random.key(0), (b, 32, 32, 3))
    start = time.perf_counter()
    ddim_sample(model, params, schedule, noise, args.steps).block_until_ready()
    results["ddim_jax_first_call_s"] = time.perf_counter() - start
    results["ddim_jax_s"] = best_of(
        lambda: ddim_sample(model, params, schedule, noise, args.steps).block_until_ready(), 1)
    print(f"DDIM {args.steps} steps batch {b}: torch {results['ddim_torch_s']:.1f} s, "
          f"jax {results['ddim_jax_s']:.1f} s", flush=True)

    results["forward_speedup"] = results["forward_torch_s"] / results["forward_jax_s"]
    results["ddim_speedup"] = results["ddim_torch_s"] / results["ddim_jax_s"]
    record = {
        "benchmark": "unet_ddim",
        "settings": {"batch": b, "ddim_steps": args.steps, "repeats": args.repeats, "image": "32x32x3",
                     "model": "google/ddpm-cifar10-32 architecture (35,746,307 parameters), random weights"},
        "machine": machine(),
        "versions": {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"), "torch": torch.__version__, "diffusers": diffusers.__version__},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_cpu_convolution_flag": flag,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if flag or jax.devices()[0].platform != "cpu" else "-default-xla"
    path = args.out / f"unet_ddim-{jax.devices()[0].platform}{suffix}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
