"""Stable Diffusion as one object, and text-to-image generation with classifier-free guidance.

``generate`` follows diffusers' ``StableDiffusionPipeline.__call__``: prompts
are tokenized to 77 ids, encoded by the CLIP text encoder (the unconditional
half from empty prompts), the latents denoised with guidance from one batched
UNet call per step, then decoded by the VAE. Text encoding, the whole sampling
loop and decoding are one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from deme_jax.diffusion import NoiseSchedule, init_carry, make_plan, sampler_step
from deme_jax.text2image.tokenizer import CLIPTokenizer

SCHEDULERS = ("ddim", "dpmpp_2m", "pndm")


@dataclasses.dataclass(frozen=True)
class StableDiffusion:
    """The components of a Stable Diffusion checkpoint; ``params`` holds one pytree per model
    (``"text_encoder"``, ``"unet"``, ``"vae"``). ``scheduler_config`` is the checkpoint's own
    scheduler_config.json, kept so that saving writes it back unchanged."""

    tokenizer: CLIPTokenizer
    text_encoder: nn.Module
    unet: nn.Module
    vae: nn.Module
    schedule: NoiseSchedule
    params: dict
    scheduler_config: dict

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    def replace(self, **changes) -> StableDiffusion:
        return dataclasses.replace(self, **changes)

    def with_unet(self, unet: nn.Module, params: dict) -> StableDiffusion:
        """This pipeline with another UNet (a finetuned or merged one) and its parameters."""
        return self.replace(unet=unet, params={**self.params, "unet": params})


def encode_prompts(pipeline: StableDiffusion, prompts: Sequence[str]) -> jax.Array:
    """The text encoder's last hidden states (B, 77, D) of ``prompts``, what the UNet attends to."""
    ids = pipeline.tokenizer(list(prompts))
    return _encode(pipeline.text_encoder, pipeline.params["text_encoder"], ids)


@functools.partial(jax.jit, static_argnums=0)
def _encode(text_encoder, params, ids):
    return text_encoder.apply({"params": params}, ids).last_hidden_state


def generate(pipeline: StableDiffusion, prompts: Sequence[str], *, num_inference_steps: int = 50,
             guidance_scale: float = 7.5, latents=None, scheduler: str = "ddim", rng=None,
             negative_prompts: Sequence[str] | None = None, height: int | None = None,
             width: int | None = None) -> np.ndarray:
    """float32 NHWC images in [0, 1], as diffusers' ``output_type="np"`` gives them.

    ``latents`` (B, height/8, width/8, 4) are the initial noise; without them
    they are drawn from ``rng`` (default key 0). ``guidance_scale`` <= 1 turns
    guidance off, as in diffusers.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate needs at least one prompt; got an empty list.")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r}: use one of {', '.join(SCHEDULERS)}.")
    negative_prompts = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts: give one each.")
    if latents is None:
        f = pipeline.vae_scale_factor
        size = pipeline.unet.sample_size
        shape = (len(prompts), (height or size * f) // f, (width or size * f) // f, pipeline.unet.in_channels)
        latents = jax.random.normal(jax.random.key(0) if rng is None else rng, shape, jnp.float32)
    latents = jnp.asarray(latents, jnp.float32)
    if latents.shape[0] != len(prompts):
        raise ValueError(f"latents hold {latents.shape[0]} samples for {len(prompts)} prompts.")
    guided = guidance_scale > 1.0
    ids = pipeline.tokenizer(negative_prompts + prompts if guided else prompts)
    plan = make_plan(pipeline.schedule, scheduler, num_inference_steps)
    images = _generate(pipeline.text_encoder, pipeline.unet, pipeline.vae, guided, pipeline.params,
                       pipeline.schedule, plan, ids, latents, jnp.float32(guidance_scale))
    return np.asarray(images)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _generate(text_encoder, unet, vae, guided, params, schedule, plan, ids, latents, guidance_scale):
    states = text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state
    return images_from_states(unet, vae, guided, params, schedule, plan, states, latents, guidance_scale)


def images_from_states(unet, vae, guided: bool, params, schedule, plan, states, latents, guidance_scale):
    """Guided sampling from text states, then VAE decoding: images in [0, 1].

    ``states`` holds the unconditional rows, then the conditional ones, when
    ``guided``; the UNet runs once per step on both halves. ``params`` needs
    ``"unet"`` and ``"vae"``. Traceable: finetuning samples its replicas with it.
    """

    def step(carry, i):
        x, sampler_carry = carry
        inputs = jnp.concatenate([x, x]) if guided else x
        t = jnp.full((inputs.shape[0],), plan.timesteps[i])
        prediction = unet.apply({"params": params["unet"]}, inputs, t, states)
        if guided:
            unconditional, conditional = jnp.split(prediction, 2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        return sampler_step(schedule, plan, sampler_carry, i, x, prediction), None

    steps = jnp.arange(plan.timesteps.shape[0])
    (latents, _), _ = jax.lax.scan(step, (latents, init_carry(plan, latents)), steps)
    latents = latents / vae.scaling_factor + (vae.shift_factor or 0.0)
    images = vae.apply({"params": params["vae"]}, latents, method="decode")
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)
