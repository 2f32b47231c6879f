"""Every random stream of a run, derived from one seed by name.

``stream_key(seed, name, *index)`` folds the CRC-32 of ``name`` and then each
index into ``jax.random.key(seed)``; ``stream_seed`` gives the same stream to
numpy (``np.random.default_rng(stream_seed(...))``). A stream's name says what
its numbers are for, so no two uses share numbers by accident, and adding a
stream changes no other.

| name | what it draws |
|---|---|
| ``params`` | the initial weights of a model trained from scratch |
| ``train`` (replica i) | each step's timesteps, noise and dropout (the step is folded in by the train step) |
| ``data`` (replica i) | the order and flips of the training batches; a latent cache's samples, caption dropout |
| ``cache_crop`` | `deme cache-latents` with `center_crop=False`: each image's crop, drawn once |
| ``heldout_noise`` | the noise of the held-out loss logged during training |
| ``heldout_latents`` | text-to-image: the latents drawn once from the held-out pairs' posteriors |
| ``sample_noise`` | the initial noise of the sample grids logged during training |
| ``merge_heldout`` | the noise of the merge search's held-out loss |
| ``merge_stop`` | the noise of the gradient merge search's early-stopping loss |
| ``lora`` | the initial LoRA adapters of DeMe replicas (``lora_A``; ``lora_B`` starts at zero) |
| ``dare`` | DARE's random drop masks |
| ``eval_noise`` (repeat k) | `deme evaluate`: the initial noise (or latents) of repeat k (from config.evaluate.seed) |
| ``report_noise`` (draw k) | the demo: the noise of held-out loss draw k of its report |
| ``gradient_conflict`` | `deme analyze`, the demo, a "conflict" partition: the images and noise of the interval gradients |
| ``directions``, ``landscape`` | `deme analyze`: random plane directions, the landscape's noise |

A pretraining run has one ``train`` and one ``data`` stream (no index); DeMe
replica i has ``train`` i and ``data`` i, the same in the stacked and the
sequential mode and on any number of processes.
"""

from __future__ import annotations

import zlib

import jax


def name_id(name: str) -> int:
    """A stable 32-bit number for ``name`` (the same on every machine and Python version)."""
    return zlib.crc32(name.encode())


def stream_key(seed: int, name: str, *index: int) -> jax.Array:
    """The JAX key of stream ``name`` (and ``index``) of ``seed``."""
    key = jax.random.fold_in(jax.random.key(seed), name_id(name))
    for i in index:
        key = jax.random.fold_in(key, i)
    return key


def stream_seed(seed: int, name: str, *index: int) -> tuple[int, ...]:
    """The numpy seed (``SeedSequence`` entropy) of stream ``name`` (and ``index``) of ``seed``."""
    return (seed, name_id(name), *index)
