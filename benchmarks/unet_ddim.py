"""UNet forward and a whole DDIM run of the CIFAR-10 DDPM: deme-jax against diffusers, same machine, same run.

    python benchmarks/unet_ddim.py [--batch 64] [--steps 100] [--repeats 3] [--no-xla-cpu-flag]

Both sides get the same random weights (diffusers' init, saved and loaded with
load_diffusers_unet). PyTorch runs eager under ``torch.no_grad`` with as many
threads as cores; JAX runs one jitted call (the forward) and one compiled
``lax.scan`` (the DDIM run), timed after a warm-up call that compiles. The
forward's convolutions are also timed one by one on both sides (same shapes,
each the median of a few calls): their sum bounds what any forward can reach
while the convolutions run at the libraries' speed. Results go to
``benchmarks/results/unet_ddim-<platform>.json`` with the machine and versions.
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
    """(input shape, kernel shape, strides, padding) -> count, for every convolution in ``apply(*args)``."""
    import jax
    from jax.extend.core import jaxprs_in_params

    found = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                p = eqn.params
                assert p["dimension_numbers"].lhs_spec == (0, 3, 1, 2) and p["feature_group_count"] == 1
                found[(eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, tuple(p["window_strides"]),
                       tuple(map(tuple, p["padding"])))] += 1
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(apply)(*args).jaxpr)
    return found


def convolution_seconds(convolutions: collections.Counter, repeats: int, backward: bool = False) -> dict:
    """The forward's convolutions timed one at a time, NHWC in JAX and NCHW in PyTorch (as the UNets run them);
    ``backward``: each with the gradients of its input and kernel as well."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    totals = {"jax": 0.0, "torch": 0.0}
    rng = np.random.default_rng(0)
    for (x_shape, w_shape, strides, padding), count in convolutions.items():
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(w_shape).astype(np.float32)
        conv = lambda x, w, strides=strides, padding=padding: jax.lax.conv_general_dilated(
            x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if backward:
            conv = jax.grad(lambda x, w, conv=conv: jnp.sum(conv(x, w) ** 2), (0, 1))
        conv = jax.jit(conv)
        xj, wj = jax.device_put(x), jax.device_put(w)
        jax.block_until_ready(conv(xj, wj))
        totals["jax"] += count * median_time(lambda: jax.block_until_ready(conv(xj, wj)), repeats)
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
    results["forward_convolutions_jax_s"], results["forward_convolutions_torch_s"] = conv_s["jax"], conv_s["torch"]
    # The best forward with JAX's convolutions and nothing else, against PyTorch's whole forward.
    results["forward_speedup_bound"] = results["forward_torch_s"] / conv_s["jax"]
    print(f"the forward's {sum(convolutions.values())} convolutions one by one: torch {conv_s['torch']:.3f} s, "
          f"jax {conv_s['jax']:.3f} s", flush=True)

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
