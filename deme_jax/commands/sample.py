"""``deme sample``: an image grid from any model path (diffusers, orbax export, training workdir)."""

from __future__ import annotations

import time

import jax
import numpy as np

from deme_jax import diffusion, interop
from deme_jax.images import save_image_grid
from deme_jax.interop.unet import DDPM_CIFAR10_CONFIG
from deme_jax.models import init_params


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="diffusers model/pipeline directory, orbax checkpoint or training workdir")
    parser.add_argument("--scheduler", help="diffusers scheduler directory (default: the model's pipeline, "
                                            "else linear betas 1e-4..0.02 over 1000 steps)")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples.png")


def run(args) -> None:
    if args.model:
        model, params = interop.load_model(args.model)
    else:
        model = interop.model_from_config(DDPM_CIFAR10_CONFIG)
        params = init_params(model, jax.random.key(args.seed))
        print("no --model given: the CIFAR-10 DDPM architecture with random weights (expect noise; "
              "pass a diffusers directory or an orbax checkpoint with --model)")
    schedule = interop.load_schedule(args.scheduler or args.model)
    size = model.sample_size or 32
    rng_noise, rng_steps = jax.random.split(jax.random.key(args.seed))
    noise = jax.random.normal(rng_noise, (args.num_images, size, size, model.in_channels))
    n_params = sum(np.size(p) for p in jax.tree_util.tree_leaves(params))
    print(f"{args.sampler.upper()} sampling {args.num_images} images of {size}x{size} with a "
          f"{n_params / 1e6:.1f}M-parameter UNet on {jax.devices()[0].platform}...")
    start = time.perf_counter()
    if args.sampler == "ddim":
        images = diffusion.ddim_sample(model, params, schedule, noise, args.steps, args.eta, rng_steps)
    else:
        images = diffusion.ddpm_sample(model, params, schedule, noise, rng_steps)
    images = jax.block_until_ready(images)
    print(f"done in {time.perf_counter() - start:.1f} s (compilation included); wrote "
          f"{save_image_grid(images, args.out)}")
