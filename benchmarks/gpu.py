"""deme-jax against PyTorch/diffusers on one NVIDIA GPU: training, DDIM sampling, FID features, DeMe replicas.

    bash benchmarks/gpu.sh [OUT_DIR]     # on the GPU box: the wheels, this benchmark, then the fast tests
    python benchmarks/gpu.py [--out DIR] [--budget 285] [--sections train ddim fid deme] [--tiny]

Model: the CIFAR-10 DDPM UNet (``DDPM_CIFAR10_CONFIG``, 35.7M parameters),
ours and diffusers' ``UNet2DModel``, each with its own random weights (speed
does not depend on them). ``float32`` allows TF32 on both sides (XLA's default
on NVIDIA GPUs; ``allow_tf32`` in torch); ``bfloat16`` is our model with
``dtype=bfloat16`` and float32 parameters, and torch under ``autocast(bfloat16)``.

- train: one epsilon-loss step with AdamW (clipped) and EMA, batch 128:
  images/s; ours compiled ahead of time (compile_s: lower + compile), theirs
  eager and with torch.compile (whose first_step_s includes compiling).
- ddim: DDIM-100 sampling of a batch of 256, ``ddim_sample`` against
  ``DDIMPipeline``: seconds per batch; first_call_s includes compiling.
- fid: FID Inception features of 32x32 uint8 images in batches of 200 with
  ``load_inception`` (pytorch-fid's weights where converted or convertible
  here, else random ones) against pytorch-fid's network, built offline with
  random weights as benchmarks/fid.py does (skipped, with the reason, where
  it does not import).
- deme: N = 1, 4, 8 replicas stacked in one step (``make_replica_step`` +
  ``map_over_replicas``), batch 128 per replica for N=1 and 32 for N=4, 8:
  compile_s, step_s, replica-images/s (N x batch / step_s), compiled memory
  (arguments + outputs + temporaries - aliased). The summary's
  ``deme_n<N>_cost_vs_plain`` is step_s over N plain float32 train steps at the
  same batch (target <= 1.4); the plain step at 32 is measured for it.
- MFU: flops is XLA's ``cost_analysis()`` of the compiled step (forward,
  backward, optimizer, EMA; before optimisation too, as a check), over step_s
  and the card's dense peak (bfloat16, or TF32 for float32; null for a card
  not in PEAK_TFLOPS).

Every number is the mean of several calls after a warm-up call, synchronised
(``block_until_ready``, ``torch.cuda.synchronize``). PyTorch and JAX run in
processes of their own, one after the other, so each has the whole GPU:
PyTorch's quick measurements first, then ours in order of importance, then
torch.compile. Each measurement has a time limit (1 to 3 minutes) and the run a
budget (--budget; with start-up, under 5 minutes): one that does not finish,
fails or ends its process is recorded as ``{"skipped": reason}`` and the rest
go on, in a new process if need be. Compiling takes minutes on a cold GPU box,
so what does not fit in the budget is skipped; --sections and a larger
--budget measure it. A line per measurement is printed as it comes;
``gpu-<card>.json`` (machine, records, summary) in --out and in
benchmarks/results/ is rewritten after each; the processes' output goes to
--out/gpu.log. --tiny: a small UNet, batches and step counts on whatever
device there is (a check of this script), written to --out only.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_CONFIG = {"sample_size": 16, "block_out_channels": [32], "layers_per_block": 1,
               "down_block_types": ["AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D"], "norm_num_groups": 8,
               "attention_head_dim": None}
SIZES = {
    "full": dict(batch=128, iters=20, ddim_batch=256, ddim_steps=100, ddim_iters=2, fid_batch=200, fid_images=1000,
                 fid_iters=3, replicas=((1, 128), (4, 32), (8, 32)), deme_iters=10),
    "tiny": dict(batch=8, iters=2, ddim_batch=4, ddim_steps=5, ddim_iters=1, fid_batch=4, fid_images=8, fid_iters=1,
                 replicas=((1, 8), (2, 8)), deme_iters=2),
}
DTYPES = ("float32", "bfloat16")
# Dense tensor-core peaks in TFLOP/s: (part of the device name, bfloat16, TF32). The first match counts.
PEAK_TFLOPS = (("H100 PCIe", 756, 378), ("H100 NVL", 835, 418), ("H100", 989, 495), ("H200", 989, 495),
               ("A100", 312, 156))
TENSORFLOW_USERS = ("clu.metric_writers", "clu.periodic_actions", "tensorflow_datasets")
MIN_START_S = 20  # a measurement is not started with less of the budget left


def stub_tensorflow_users() -> None:
    """Without TensorFlow, stand-ins for the modules that import it and that deme_jax imports at module level
    (clu's metric writers and progress reports, tensorflow_datasets); using one raises an AttributeError."""
    if importlib.util.find_spec("tensorflow") is not None:
        return
    for name in TENSORFLOW_USERS:
        module = types.ModuleType(name, f"stand-in: {name} needs TensorFlow, which is not installed")

        def missing(attribute, name=name):
            raise AttributeError(f"{name}.{attribute}: {name} needs TensorFlow, which is not installed")

        module.__getattr__ = missing
        sys.modules.setdefault(name, module)


def timed(run, iters: int, sync) -> tuple[float, float]:
    """Seconds of a first (warm-up) call of ``run``, and the mean seconds of ``iters`` more; ``sync(output)``
    waits for the device."""
    start = time.perf_counter()
    sync(run())
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(iters):
        output = run()
    sync(output)
    return first, (time.perf_counter() - start) / iters


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def peak_flops(device: str, dtype: str) -> float | None:
    for name, bf16, tf32 in PEAK_TFLOPS:
        if name in device:
            return (bf16 if dtype == "bfloat16" else tf32) * 1e12
    return None


def model_config(tiny: bool) -> dict:
    from deme_jax.interop.unet import DDPM_CIFAR10_CONFIG

    return TINY_CONFIG if tiny else DDPM_CIFAR10_CONFIG


# --- JAX (one process) --------------------------------------------------------------------------------------

def jax_machine(item, tiny):
    import jax

    from benchmarks.unet_ddim import machine

    packages = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint",
                "ml-collections", "clu")
    return {**machine(), "device_kind": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "default_matmul_precision": jax.config.jax_default_matmul_precision,
            "tensorflow": importlib.util.find_spec("tensorflow") is not None,
            "versions": {p: version(p) for p in packages}}


@functools.cache
def jax_model(tiny: bool):
    """Our UNet and its parameters, made once per process (steps donate copies of them)."""
    import jax

    from deme_jax.interop import model_from_config
    from deme_jax.models import init_params

    model = model_from_config(model_config(tiny))
    return model, init_params(model, jax.random.key(0))


def jax_images(shape):
    import numpy as np

    return np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)


def compiled_step(jitted, state, inputs: tuple, iters: int, dtype: str) -> dict:
    """``jitted(state, *inputs) -> (state, metrics)`` compiled ahead of time, then timed; with XLA's memory and
    FLOP counts of the compiled program."""
    import jax
    import numpy as np

    start = time.perf_counter()
    lowered = jitted.lower(state, *inputs)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    carry = {"state": state}

    def run():
        carry["state"], carry["metrics"] = compiled(carry["state"], *inputs)
        return carry["metrics"]

    _, step_s = timed(run, iters, jax.block_until_ready)
    memory = compiled.memory_analysis()
    flops = (compiled.cost_analysis() or {}).get("flops")
    peak = peak_flops(jax.devices()[0].device_kind, dtype)
    return {"compile_s": compile_s, "step_s": step_s, "loss": float(np.mean(carry["metrics"]["loss"])),
            "memory_bytes": memory and memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes,
            "flops": flops, "flops_before_optimisation": (lowered.cost_analysis() or {}).get("flops"),
            "tflops_per_s": flops and flops / step_s / 1e12, "peak_tflops_per_s": peak and peak / 1e12,
            "mfu": peak and flops and flops / step_s / peak}


def jax_train(item, tiny):
    import jax
    import jax.numpy as jnp

    from deme_jax.defaults import training_config
    from deme_jax.diffusion import make_schedule
    from deme_jax.diffusion.timesteps import uniform_partition
    from deme_jax.train.state import create_train_state, make_optimizer
    from deme_jax.train.step import make_train_step

    model, params = jax_model(tiny)
    model = model.clone(dtype=jnp.dtype(item["dtype"]))
    config, schedule = training_config(), make_schedule()
    optimizer = make_optimizer(config.optim)
    step = make_train_step(model, schedule, optimizer, config.ema,
                           uniform_partition(schedule.num_train_timesteps, config.train.loss_intervals))
    state = create_train_state(jax.tree_util.tree_map(jnp.copy, params), optimizer, jax.random.key(1))
    images = jnp.asarray(jax_images((item["batch"], model.sample_size, model.sample_size, model.in_channels)))
    result = compiled_step(jax.jit(step, donate_argnums=0), state, (images,), item["iters"], item["dtype"])
    return {"images_per_s": item["batch"] / result["step_s"], **result}


def jax_deme(item, tiny):
    import jax

    from deme_jax.defaults import deme_config
    from deme_jax.deme.replicas import (init_replicas, interval_tasks, make_replica_step, map_over_replicas,
                                        replica_shardings, with_identity_projections)
    from deme_jax.diffusion import make_schedule
    from deme_jax.diffusion.timesteps import uniform_partition
    from deme_jax.train.sharding import make_mesh
    from deme_jax.train.state import make_optimizer

    n, batch = item["replicas"], item["batch"]
    teacher, teacher_params = jax_model(tiny)
    student, params = with_identity_projections(teacher, teacher_params)
    config, schedule = deme_config(), make_schedule()
    T = schedule.num_train_timesteps
    optimizer = make_optimizer(config.optim)
    step = make_replica_step(student, teacher, schedule, optimizer, config.ema,
                             uniform_partition(T, config.train.loss_intervals), config.deme.global_prob,
                             config.deme.consistency_weight)
    mesh = make_mesh(config.mesh.shape, n)
    state_sharding, data_sharding, task_shardings = replica_shardings(mesh)
    init = jax.jit(lambda params, rngs: init_replicas(params, optimizer, rngs), out_shardings=state_sharding)
    state = init(params, jax.random.split(jax.random.key(1), n))
    size, channels = teacher.sample_size, teacher.in_channels
    images = jax.device_put(jax_images((n, batch, size, size, channels)), data_sharding)
    tasks = jax.device_put(interval_tasks(uniform_partition(T, n), teacher_params), task_shardings)
    train = jax.jit(map_over_replicas(step, mesh), donate_argnums=0)
    result = compiled_step(train, state, (images, tasks), item["iters"], "float32")
    return {"replica_images_per_s": n * batch / result["step_s"], **result}


def jax_ddim(item, tiny):
    import jax
    import jax.numpy as jnp

    from deme_jax.diffusion import ddim_sample, make_schedule

    model, params = jax_model(tiny)
    model = model.clone(dtype=jnp.dtype(item["dtype"]))
    noise = jax.random.normal(jax.random.key(0), (item["batch"], model.sample_size, model.sample_size,
                                                  model.in_channels))
    schedule = make_schedule()
    first, seconds = timed(lambda: ddim_sample(model, params, schedule, noise, item["steps"]), item["iters"],
                           jax.block_until_ready)
    return {"seconds_per_batch": seconds, "images_per_s": item["batch"] / seconds, "first_call_s": first}


def inception_weights(directory: str) -> tuple[str, str]:
    """pytorch-fid's weights where they are converted or convertible here, else random ones in our format (the
    compute is the same): (path, which)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util
    from safetensors.numpy import save_file

    from deme_jax.metrics import fid, fid_weights

    try:
        return fid_weights.ensure_default_weights(), "pytorch-fid"
    except FileNotFoundError:
        pass
    shapes = jax.eval_shape(fid.FIDInceptionV3().init, jax.random.key(0),
                            jnp.zeros((1, fid.INPUT_SIZE, fid.INPUT_SIZE, 3)))
    rng, tensors = np.random.default_rng(0), {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        if path[-1] == "kernel":  # HWIO here, OIHW in the file
            value = rng.normal(0, np.prod(leaf.shape[:-1]) ** -0.5, leaf.shape).transpose(3, 2, 0, 1)
        else:
            value = np.ones(leaf.shape) if path[-1] in ("scale", "var") else np.zeros(leaf.shape)
        tensors[fid_weights.torch_name(path)] = np.ascontiguousarray(value, np.float32)
    path = os.path.join(directory, "random.safetensors")
    save_file(tensors, path)
    return path, "random"


def jax_fid(item, tiny):
    import jax
    import numpy as np

    from deme_jax.metrics import load_inception

    with tempfile.TemporaryDirectory() as directory:
        path, weights = inception_weights(directory)
        features = load_inception(path, batch_size=item["batch"])
    images = np.random.default_rng(0).integers(0, 256, (item["images"], 32, 32, 3), dtype=np.uint8)
    first, seconds = timed(lambda: features(images), item["iters"], jax.block_until_ready)
    return {"images_per_s": item["images"] / seconds, "first_call_s": first, "weights": weights}


# --- PyTorch (another process) ------------------------------------------------------------------------------

def torch_device():
    """The device, with TF32 allowed, cuDNN's autotuning on, every core for the CPU, and a fixed seed."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_sync(output):
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_machine(item, tiny):
    import diffusers
    import torch

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "diffusers": diffusers.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def torch_train(item, tiny):
    """The same step in PyTorch: epsilon loss, AdamW (fused on a GPU) with clipping, EMA by lerp."""
    import torch
    from diffusers import UNet2DModel

    from deme_jax.defaults import training_config

    device, batch = torch_device(), item["batch"]
    config = training_config()
    unet = UNet2DModel(**model_config(tiny)).to(device).train()
    parameters = list(unet.parameters())
    ema = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=config.optim.lr, betas=(config.optim.b1, config.optim.b2),
                                  eps=config.optim.eps, weight_decay=config.optim.weight_decay,
                                  fused=device.type == "cuda")
    forward = torch.compile(unet) if item["mode"] == "compile" else unet
    size, channels = unet.config.sample_size, unet.config.in_channels
    x0 = torch.rand(batch, channels, size, size, device=device) * 2 - 1
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=device), 0)  # make_schedule()'s

    def step():
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x0)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        with torch.autocast(device.type, torch.bfloat16, enabled=item["dtype"] == "bfloat16"):
            prediction = forward(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.optim.grad_clip)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, parameters, 1 - config.ema.max_decay)
        return loss

    first, seconds = timed(step, item["iters"], torch_sync)
    return {"images_per_s": batch / seconds, "step_s": seconds, "first_step_s": first}


def torch_ddim(item, tiny):
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    device = torch_device()
    pipeline = DDIMPipeline(UNet2DModel(**model_config(tiny)).to(device).eval(), DDIMScheduler())
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=device).manual_seed(0)

    def run():
        with torch.autocast(device.type, torch.bfloat16, enabled=item["dtype"] == "bfloat16"):
            return pipeline(batch_size=item["batch"], generator=generator, num_inference_steps=item["steps"],
                            output_type="np")

    first, seconds = timed(run, item["iters"], torch_sync)
    return {"seconds_per_batch": seconds, "images_per_s": item["batch"] / seconds, "first_call_s": first}


def torch_fid(item, tiny):
    """pytorch-fid's InceptionV3([2048]) as its get_activations feeds it: float batches from the host, features
    back to the host."""
    import numpy as np
    import torch

    from tests.test_fid import fid_inception_module, pytorch_fid_model

    device = torch_device()
    model = pytorch_fid_model(fid_inception_module()).to(device).eval()
    images = np.random.default_rng(0).integers(0, 256, (item["images"], 32, 32, 3), dtype=np.uint8)
    batches = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).split(item["batch"])

    def run():
        with torch.no_grad():
            return [model(batch.to(device))[0].squeeze(3).squeeze(2).cpu() for batch in batches]

    first, seconds = timed(run, item["iters"], torch_sync)
    return {"images_per_s": item["images"] / seconds, "first_call_s": first}


MEASUREMENTS = {
    ("jax", "machine"): jax_machine, ("jax", "train"): jax_train, ("jax", "deme"): jax_deme,
    ("jax", "ddim"): jax_ddim, ("jax", "fid"): jax_fid,
    ("torch", "machine"): torch_machine, ("torch", "train"): torch_train, ("torch", "ddim"): torch_ddim,
    ("torch", "fid"): torch_fid,
}


def child(items: list[dict], tiny: bool) -> None:
    """Measures ``items`` (one framework) in order, one JSON line each on stdout; all else printed goes to
    stderr."""
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from deme_jax.xla_cpu import use_all_cores_for_convolutions

    use_all_cores_for_convolutions()
    stub_tensorflow_users()
    for item in items:
        try:
            record = MEASUREMENTS[item["framework"], item["section"]](item, tiny)
        except Exception as e:  # recorded; the next measurement goes on
            traceback.print_exc()
            record = {"skipped": f"{type(e).__name__}: {e}"[:500]}
        channel.write(json.dumps(record) + "\n")
        channel.flush()


# --- the run: a plan of measurements, child processes, the results file ------------------------------------

def plan(sizes: dict, sections: list[str]) -> list[dict]:
    """The measurements in the order they run: PyTorch's (quick), ours by priority, then torch.compile."""
    def item(framework, section, limit_s, **fields):
        return {"section": section, "framework": framework, **fields, "limit_s": limit_s}

    train = dict(batch=sizes["batch"], iters=sizes["iters"])
    ddim = dict(batch=sizes["ddim_batch"], steps=sizes["ddim_steps"], iters=sizes["ddim_iters"])
    fid = dict(batch=sizes["fid_batch"], images=sizes["fid_images"], iters=sizes["fid_iters"])
    deme = [item("jax", "deme", 180, replicas=n, batch=b, iters=sizes["deme_iters"])
            for n, b in sizes["replicas"]]
    plain = [item("jax", "train", 120, dtype="float32", batch=b, iters=sizes["iters"])
             for b in sorted({b for _, b in sizes["replicas"]} - {sizes["batch"]})]
    items = [
        *[item("torch", "train", 60, mode="eager", dtype=d, **train) for d in DTYPES],
        *[item("torch", "ddim", 60, dtype=d, **ddim) for d in DTYPES],
        item("torch", "fid", 60, **fid),
        *[item("jax", "train", 120, dtype=d, **train) for d in DTYPES],
        deme[0],
        *[item("jax", "ddim", 90, dtype=d, **ddim) for d in DTYPES],
        item("jax", "fid", 90, **fid),
        *plain, *deme[1:],
        item("torch", "train", 180, mode="compile", dtype="bfloat16", **train),
    ]
    ordered = []
    for i in (i for i in items if i["section"] in sections):
        if not any(o["framework"] == i["framework"] for o in ordered):  # versions and device, first
            ordered.append(item(i["framework"], "machine", 90))
        ordered.append(i)
    return ordered


def nvidia_smi() -> dict | None:
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, check=True, timeout=60).stdout
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    name, driver, memory = (field.strip() for field in query.splitlines()[0].split(","))
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return {"name": name, "driver": driver, "memory": memory, "cuda": cuda and cuda.group(1)}


def run_process(items: list[dict], tiny: bool, deadline: float, log) -> list[dict]:
    """Records of ``items`` (one framework) from one child process, up to the first that does not finish in its
    limit (or the budget) or ends the process: that one is recorded as skipped and the rest are left."""
    # torch's process imports deme_jax: JAX there stays off the GPU (which it would take 75% of on first use)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"} if items[0]["framework"] == "torch" else None
    command = [sys.executable, __file__, "--child", json.dumps(items)] + ["--tiny"] * tiny
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                               start_new_session=True)
    lines = queue.Queue()
    threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True).start()
    records = []
    for item in items:
        start = time.monotonic()
        try:
            line = lines.get(timeout=max(min(item["limit_s"], deadline - start), 0))
        except queue.Empty:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            reason = (f"did not finish in its {item['limit_s']} s" if item["limit_s"] < deadline - start
                      else "did not finish before the run's budget ran out")
            return records + [{"skipped": reason, "wall_s": time.monotonic() - start}]
        if line is None:
            reason = f"the process ended (exit code {process.wait()}); last in its log: {last_line(log.name)}"
            return records + [{"skipped": reason, "wall_s": time.monotonic() - start}]
        records.append({**json.loads(line), "wall_s": time.monotonic() - start})
    process.wait()
    return records


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def last_line(path: str) -> str:
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def summary(records: list[dict]) -> dict:
    """Ours against theirs where both were measured, and DeMe steps against N plain steps at the same batch."""
    def find(**fields):
        return next((r for r in records if "skipped" not in r and all(r.get(k) == v for k, v in fields.items())),
                    None)

    ratios = {}
    for theirs in (r for r in records if r["framework"] == "torch" and "skipped" not in r):
        ours = find(framework="jax", **{k: theirs[k] for k in ("section", "dtype", "batch") if k in theirs})
        if ours:
            name = "_".join(v for v in (theirs["section"], theirs.get("dtype"), "vs_torch", theirs.get("mode")) if v)
            ratios[name] = ours["images_per_s"] / theirs["images_per_s"]
    for deme in (r for r in records if r["section"] == "deme" and "skipped" not in r):
        plain = find(section="train", framework="jax", dtype="float32", batch=deme["batch"])
        if plain:
            ratios[f"deme_n{deme['replicas']}_cost_vs_plain"] = deme["step_s"] / (deme["replicas"] * plain["step_s"])
    return ratios


def progress(record: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "deme-jax-gpu")
    parser.add_argument("--budget", type=float, default=285,
                        help=f"seconds for all measurements (none starts with less than {MIN_START_S} s left)")
    parser.add_argument("--sections", nargs="+", choices=("train", "ddim", "fid", "deme"),
                        default=["train", "ddim", "fid", "deme"])
    parser.add_argument("--tiny", action="store_true", help="small UNet and sizes; results only to --out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child), args.tiny)
    deadline = time.monotonic() + args.budget
    gpu = nvidia_smi()
    if gpu is None and not args.tiny:
        parser.error("no NVIDIA GPU found (nvidia-smi); --tiny checks this script on another device")
    card = re.sub(r"[^a-z0-9]+", "-", gpu["name"].lower().removeprefix("nvidia")).strip("-") if gpu else "cpu"
    paths = [args.out / f"gpu-{card}.json"] + ([] if args.tiny else [Path(__file__).parent / "results" /
                                                                     f"gpu-{card}.json"])
    sizes = SIZES["tiny" if args.tiny else "full"]
    document = {"benchmark": "gpu",
                "settings": {"model": "tiny UNet" if args.tiny else "CIFAR-10 DDPM UNet (35.7M parameters)",
                             "budget_s": args.budget, "sections": args.sections, **sizes},
                "machine": {"nvidia_smi": gpu}, "records": [], "summary": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    pending = plan(sizes, args.sections)
    print(f"{len(pending)} measurements, {args.budget:.0f} s; processes' output in {args.out / 'gpu.log'}",
          flush=True)
    with open(args.out / "gpu.log", "w") as log:
        while pending:
            framework = pending[0]["framework"]
            count = next((i for i, item in enumerate(pending) if item["framework"] != framework), len(pending))
            if deadline - time.monotonic() < MIN_START_S:
                records = [{"skipped": "not started: the run's budget was spent"}] * count
            else:
                records = run_process(pending[:count], args.tiny, deadline, log)
            for item, record in zip(pending, records):
                record = {k: v for k, v in item.items() if k != "limit_s"} | record
                if item["section"] == "machine":
                    document["machine"][framework] = record
                else:
                    document["records"].append(record)
                    document["summary"] = summary(document["records"])
                print(progress(record), flush=True)
                for path in paths:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(document, indent=2) + "\n")
            pending = pending[len(records):]
    print(json.dumps(document["summary"], indent=2))
    print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
