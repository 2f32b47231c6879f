"""``deme sample``: an image grid from any model path (diffusers, orbax export, training workdir), or from a
Stable Diffusion directory and prompts."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from deme_jax import diffusion, interop, text2image
from deme_jax.images import save_image_grid, to_uint8
from deme_jax.interop.unet import DDPM_CIFAR10_CONFIG
from deme_jax.models import init_params


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="diffusers model/pipeline directory (a Stable Diffusion one with --prompt), "
                                        "orbax checkpoint or training workdir")
    parser.add_argument("--scheduler", help="diffusers scheduler directory (default: the model's pipeline, "
                                            "else linear betas 1e-4..0.02 over 1000 steps)")
    parser.add_argument("--sampler", choices=("ddim", "ddpm", "dpmpp_2m", "pndm"), default="ddim")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (DDIM, DPM-Solver++)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    parser.add_argument("--num-images", type=int, help="images (default 16), or images per prompt (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples.png", help="the grid; with prompts, the images go to a "
                                                             "directory of the same name without the suffix")
    parser.add_argument("--prompt", action="append", help="text-to-image prompt (repeat for several)")
    parser.add_argument("--prompts", help="a file of prompts, one per line")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--batch-size", type=int, default=4, help="images per compiled batch (text-to-image)")


def run(args) -> None:
    if args.prompt or args.prompts:
        return run_text_to_image(args)
    if args.model:
        model, params = interop.load_model(args.model)
    else:
        model = interop.model_from_config(DDPM_CIFAR10_CONFIG)
        params = init_params(model, jax.random.key(args.seed))
        print("no --model given: the CIFAR-10 DDPM architecture with random weights (expect noise; "
              "pass a diffusers directory or an orbax checkpoint with --model)")
    schedule = interop.load_schedule(args.scheduler or args.model)
    size = model.sample_size or 32
    num_images = args.num_images or 16
    rng_noise, rng_steps = jax.random.split(jax.random.key(args.seed))
    noise = jax.random.normal(rng_noise, (num_images, size, size, model.in_channels))
    n_params = sum(np.size(p) for p in jax.tree_util.tree_leaves(params))
    print(f"{args.sampler.upper()} sampling {num_images} images of {size}x{size} with a "
          f"{n_params / 1e6:.1f}M-parameter UNet on {jax.devices()[0].platform}...")
    start = time.perf_counter()
    images = jax.block_until_ready(diffusion.sample(
        model, params, schedule, noise, args.sampler, args.steps, eta=args.eta, rng=rng_steps))
    print(f"done in {time.perf_counter() - start:.1f} s (compilation included); wrote "
          f"{save_image_grid(images, args.out)}")


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{args.prompts} holds no prompt (one per line).")
    return [p for p in prompts for _ in range(args.num_images or 1)]


def run_text_to_image(args) -> None:
    """Prompts in batches of ``--batch-size`` (the last padded, so one program serves all), batch k from
    ``fold_in(key(seed), k)``; writes every image and a grid."""
    if not args.model:
        raise ValueError("--prompt needs --model: a Stable Diffusion directory (model_index.json, unet/, vae/, "
                         "text_encoder/, tokenizer/, scheduler/).")
    if args.sampler not in text2image.SCHEDULERS:
        raise ValueError(f"--sampler {args.sampler} does not sample Stable Diffusion; use one of "
                         f"{', '.join(text2image.SCHEDULERS)}.")
    prompts = read_prompts(args)
    pipeline = interop.load_stable_diffusion(args.model)
    out_dir = Path(args.out).with_suffix("")
    out_dir.mkdir(parents=True, exist_ok=True)
    images, start = [], time.perf_counter()
    for k in range(0, len(prompts), args.batch_size):
        batch = prompts[k:k + args.batch_size]
        padded = batch + [""] * (args.batch_size - len(batch))
        rng = jax.random.fold_in(jax.random.key(args.seed), k // args.batch_size)
        out = text2image.generate(pipeline, padded, num_inference_steps=args.steps, guidance_scale=args.guidance,
                                  scheduler=args.sampler, rng=rng)[:len(batch)]
        for i, image in enumerate(to_uint8(out * 2 - 1), start=k):
            Image.fromarray(image).save(out_dir / f"{i:05d}.png")
        images.append(out)
        print(f"{k + len(batch)}/{len(prompts)} images ({time.perf_counter() - start:.0f} s)", flush=True)
    with open(out_dir / "prompts.txt", "w") as f:
        f.writelines(f"{i:05d}.png\t{p}\n" for i, p in enumerate(prompts))
    print(f"wrote {len(prompts)} images to {out_dir} and the grid {save_image_grid(np.concatenate(images) * 2 - 1, args.out)}")
