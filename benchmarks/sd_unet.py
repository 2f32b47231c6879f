"""The Stable Diffusion 1.5 UNet: forward and one training step, deme-jax against diffusers, same machine, same run.

    python benchmarks/sd_unet.py [--batch 4] [--latent 64] [--repeats 2] [--dtype float32|bfloat16]

SD 1.5's UNet (859,520,964 parameters) with diffusers' random init; our side
gets the same weights. The training step is SD's: epsilon MSE of the UNet at
random timesteps given text states (B, 77, 768), then an SGD update (lr 1e-5;
AdamW's two moments would add 6.9 GB on each side, more than a 24 GB machine
holds beside the rest), in float32 (or bf16 compute on our side with
``--dtype bfloat16``). PyTorch runs eager
with as many threads as cores; JAX runs one jitted forward and one jitted step
with donated state, timed after a warm-up call that compiles. Our compiled
memory comes from XLA's ahead-of-time analysis, with and without per-block
rematerialisation; the step runs without it where its arguments and temporaries
fit in 80% of the machine's memory, else with it, else not at all (its compiled
memory is then the result). PyTorch's memory is the growth of the
process's peak RSS. The PyTorch side is freed before ours runs, so the two
never share the memory. Results go to ``benchmarks/results/sd_unet-<platform>.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.metadata
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.unet_ddim import best_of, machine  # noqa: E402
from deme_jax.xla_cpu import use_all_cores_for_convolutions  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def release_freed_memory() -> None:
    """Returns memory that Python and PyTorch freed to the system (glibc keeps it otherwise), so the JAX side
    has the machine's memory that the PyTorch side used."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def torch_side(config: dict, batch: int, latent: int, repeats: int, results: dict) -> dict:
    """Times diffusers' UNet and returns its weights as numpy arrays (then frees it)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=generator)
    states = torch.randn(batch, 77, config["cross_attention_dim"], generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    noise = torch.randn(x.shape, generator=generator)

    def forward():
        with torch.no_grad():
            unet(x, t, states)

    unet.eval()
    forward()
    results["forward_torch_s"] = best_of(forward, repeats)
    print(f"torch forward: {results['forward_torch_s']:.2f} s", flush=True)

    unet.train()
    optimizer = torch.optim.SGD(unet.parameters(), lr=1e-5)
    before = peak_rss_gib()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(unet(x, t, states).sample, noise)
        loss.backward()
        optimizer.step()

    step()
    results["train_step_torch_peak_rss_growth_gib"] = peak_rss_gib() - before
    results["train_step_torch_s"] = best_of(step, repeats)
    print(f"torch train step: {results['train_step_torch_s']:.2f} s", flush=True)
    unet = optimizer = None  # frees the weights and the optimizer state (the closures above are done with)
    release_freed_memory()
    torch.manual_seed(0)  # the initial weights again, for our side
    return {k: v.numpy() for k, v in UNet2DConditionModel.from_config(config).state_dict().items()}


def jax_side(config: dict, weights: dict, batch: int, latent: int, repeats: int, dtype: str, results: dict):
    import jax
    import jax.numpy as jnp
    import optax

    from deme_jax.interop.torch_layout import params_from_state_dict
    from deme_jax.interop.unet_condition import model_from_config
    from deme_jax.models import param_shapes

    model = model_from_config(config).clone(dtype=jnp.dtype(dtype))
    params = params_from_state_dict(param_shapes(model), weights)
    weights.clear()  # the caller's numpy copy: 3.2 GiB the step needs
    release_freed_memory()
    rng = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(rng[0], (batch, latent, latent, 4))
    states = jax.random.normal(rng[1], (batch, 77, config["cross_attention_dim"]))
    t = jax.random.randint(rng[2], (batch,), 0, 1000)
    noise = jax.random.normal(rng[3], x.shape)

    forward = jax.jit(lambda p: model.apply({"params": p}, x, t, states))
    start = time.perf_counter()
    forward(params).block_until_ready()
    results["forward_jax_first_call_s"] = time.perf_counter() - start
    results["forward_jax_s"] = best_of(lambda: forward(params).block_until_ready(), repeats)
    print(f"jax forward: {results['forward_jax_s']:.2f} s", flush=True)

    optimizer = optax.sgd(1e-5)

    def make_step(model):
        def step(params, opt_state):
            loss_fn = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x, t, states) - noise))
            grads = jax.grad(loss_fn)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state
        return step

    opt_state = optimizer.init(params)
    compiled = {}
    for remat in (False, True):  # ahead of time: XLA's memory plan without allocating it
        step = make_step(model.clone(remat=remat))
        compiled[remat] = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state).compile()
        memory = compiled[remat].memory_analysis()
        results[f"train_step_jax_compiled_gib_remat_{'on' if remat else 'off'}"] = {
            "arguments": memory.argument_size_in_bytes / 2**30, "outputs": memory.output_size_in_bytes / 2**30,
            "temporaries": memory.temp_size_in_bytes / 2**30, "aliased": memory.alias_size_in_bytes / 2**30}
        print(f"jax train step, remat {remat}: {memory.temp_size_in_bytes / 2**30:.1f} GiB of temporaries", flush=True)
    # The step runs where its arguments and temporaries fit in 80% of the machine's memory (remat on
    # if only that fits); otherwise the compiled memory is the result and the time is left out.
    memory_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    needs = lambda r: compiled[r].memory_analysis().temp_size_in_bytes + compiled[r].memory_analysis().argument_size_in_bytes
    runnable = [r for r in (False, True) if needs(r) < 0.8 * memory_bytes]
    if not runnable:
        results["train_step_jax_s"] = None
        results["train_step_jax_skipped"] = f"needs more than 80% of this machine's {memory_bytes / 2**30:.0f} GiB"
        print(results["train_step_jax_skipped"], flush=True)
        return
    results["train_step_jax_remat"] = runnable[0]
    step = compiled[runnable[0]]
    state = step(params, opt_state)
    jax.block_until_ready(state)

    def run():
        nonlocal state
        state = step(*state)
        jax.block_until_ready(state)

    results["train_step_jax_s"] = best_of(run, repeats)
    print(f"jax train step (remat {runnable[0]}): {results['train_step_jax_s']:.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--skip-torch", action="store_true", help="ours only (where diffusers is not installed)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    flag = use_all_cores_for_convolutions()

    import jax

    from deme_jax.interop.unet_condition import SD15_CONFIG

    results = {}
    versions = {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib")}
    if args.skip_torch:
        from deme_jax.interop.torch_layout import state_dict_from_params
        from deme_jax.interop.unet_condition import model_from_config
        from deme_jax.models import init_params

        weights = state_dict_from_params(init_params(model_from_config(SD15_CONFIG), jax.random.key(0)))
    else:
        import diffusers
        import torch

        versions.update(torch=torch.__version__, diffusers=diffusers.__version__)
        weights = torch_side(SD15_CONFIG, args.batch, args.latent, args.repeats, results)
    jax_side(SD15_CONFIG, weights, args.batch, args.latent, args.repeats, args.dtype, results)
    if not args.skip_torch:
        results["forward_speedup"] = results["forward_torch_s"] / results["forward_jax_s"]
        if results["train_step_jax_s"]:
            results["train_step_speedup"] = results["train_step_torch_s"] / results["train_step_jax_s"]
    record = {
        "benchmark": "sd_unet",
        "settings": {"batch": args.batch, "latent": f"{args.latent}x{args.latent}x4", "text_states": "77x768",
                     "dtype": args.dtype, "repeats": args.repeats, "optimizer": "SGD lr 1e-5",
                     "model": "Stable Diffusion 1.5 UNet2DConditionModel config, random weights"},
        "machine": machine(),
        "versions": versions,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_cpu_convolution_flag": flag,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.dtype == "float32" else f"-{args.dtype}"
    path = args.out / f"sd_unet-{jax.devices()[0].platform}{suffix}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
