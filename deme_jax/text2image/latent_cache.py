"""The latent cache: image-caption pairs encoded once by a Stable Diffusion pipeline's VAE and text encoder, so that
finetuning runs neither.

A cache directory holds::

    index.json        what made it (``spec``: the encoders' fingerprint, the data source, the shapes) and its shards
    empty_text.npy    the empty caption's text states (77, D), for caption dropout
    shard_00000/      examples [0, shard_size): latent_mean.npy and latent_std.npy (n, h, w, c), text.npy (n, 77, D)
                      in the spec's dtype, examples.json (the name and caption of each row)

A shard is written into a temporary directory and renamed into place once complete, so a killed run leaves whole
shards only. A restart with the same spec writes the missing ones; each is a pure function of its examples, so the
finished cache is bit-identical to an uninterrupted one (same device and batch size). Process p of P writes shards
p, p + P, ...; the cache is complete when every shard is on disk.

The posterior is kept as its mean and std: finetuning draws ``(mean + std * eps - shift_factor) * scaling_factor``
afresh at every step, as diffusers' training scripts sample ``latent_dist`` each time.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
from absl import logging

from deme_jax.data.stream import ROW_DRAWS, BatchStream, to_model_range
from deme_jax.text2image.pipeline import StableDiffusion, encode_prompts

FORMAT = "deme-latent-cache/1"
INDEX, EMPTY_TEXT, EXAMPLES = "index.json", "empty_text.npy", "examples.json"
ARRAYS = ("latent_mean", "latent_std", "text")
DTYPES = ("float32", "float16")  # float32 keeps the encoders' outputs exactly; float16 halves the disk
# Module fields that say how a model computes, not which model it is: a cache serves the model run either way.
HOW_IT_RUNS = ("parent", "name", "dtype", "remat")


def weights_fingerprint(pipeline: StableDiffusion) -> str:
    """16 hex digits of the SHA-256 of what cached examples depend on: the VAE's and the text encoder's config
    fields and weights, and the tokenizer. The same weights give the same fingerprint from any file format."""
    digest = hashlib.sha256()
    for name in ("vae", "text_encoder"):
        module = getattr(pipeline, name)
        fields = {f.name: repr(getattr(module, f.name)) for f in dataclasses.fields(module)
                  if f.name not in HOW_IT_RUNS}
        digest.update(json.dumps([name, fields], sort_keys=True).encode())
        for key, leaf in jax.tree_util.tree_flatten_with_path(pipeline.params[name])[0]:
            array = np.ascontiguousarray(leaf)
            digest.update(f"{jax.tree_util.keystr(key)} {array.dtype} {array.shape}".encode())
            digest.update(array.tobytes())
    digest.update(pipeline.tokenizer.backend.to_str().encode())
    return digest.hexdigest()[:16]


def latent_cache_dir(cache_dir: str, workdir: str | Path, split: str) -> Path:
    """Where the cache of ``split`` lives: ``config.cache.dir`` (default WORKDIR/latent_cache), a subdirectory per
    split."""
    return Path(cache_dir or Path(workdir) / "latent_cache") / re.sub(r"[^\w.-]+", "_", split)


def check_cache_options(pipeline: StableDiffusion, resolution: int, shard_size: int, batch_size: int,
                        dtype: str) -> None:
    """Refuses, naming the config field, what ``build_latent_cache`` cannot do with ``pipeline``."""
    factor = pipeline.vae_scale_factor
    if resolution % factor:
        raise ValueError(f"config.data.image_size={resolution} is not a multiple of {factor}, the VAE's downsampling "
                         f"factor; use e.g. {max(factor, resolution // factor * factor)}.")
    for field, value in (("shard_size", shard_size), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.cache.{field}={value!r} must be a positive int.")
    if dtype not in DTYPES:
        raise ValueError(f"config.cache.dtype={dtype!r}: use one of {', '.join(DTYPES)}.")


@functools.partial(jax.jit, static_argnums=0)
def _posterior(vae, params, images):
    posterior = vae.apply({"params": params}, images, method="encode")
    return posterior.mean, posterior.std


def encode_examples(pipeline: StableDiffusion, images: np.ndarray, captions: list[str]):
    """float32 numpy (posterior mean, posterior std, text states) of uint8 NHWC ``images`` and their ``captions``."""
    mean, std = _posterior(pipeline.vae, pipeline.params["vae"], to_model_range(images))
    return np.asarray(mean), np.asarray(std), np.asarray(encode_prompts(pipeline, captions))


def shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def write_atomically(path: Path, write) -> None:
    """``write(temporary path)``, then a rename: readers and restarts never see half a file or directory."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    write(tmp)
    os.replace(tmp, path)


def save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save would add .npy to a temporary name
        np.save(f, array)


def write_json(path: Path, record) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))


def read_index(path: Path) -> dict | None:
    return json.loads((path / INDEX).read_text()) if (path / INDEX).is_file() else None


def differences(old, new, field: str = "") -> list[str]:
    """``field: old -> new`` for every leaf of two specs that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(old.keys() | new.keys())
                for d in differences(old.get(key), new.get(key), f"{field}.{key}" if field else key)]
    return [] if old == new else [f"{field}: {old!r} in the cache -> {new!r} now"]


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def load_ahead(source, batches: list[range]):
    """The examples of each batch in turn, the next batch loading on threads meanwhile (PIL releases the GIL)."""
    with ThreadPoolExecutor(min(16, 2 * (os.cpu_count() or 1)), thread_name_prefix="deme-cache") as pool:
        pending = None
        for batch in [*batches, None]:
            loading = None if batch is None else [pool.submit(source.__getitem__, i) for i in batch]
            if pending is not None:
                yield [future.result() for future in pending]
            pending = loading


def encode_batch(pipeline: StableDiffusion, examples: list, batch_size: int):
    """The arrays of ``examples`` (padded to ``batch_size`` rows for the one compiled program, then cut) and what
    examples.json says of them."""
    pad = batch_size - len(examples)
    images = np.stack([e.image for e in examples] + [examples[-1].image] * pad)
    arrays = encode_examples(pipeline, images, [e.caption for e in examples] + [""] * pad)
    return [a[:len(examples)] for a in arrays], [{"name": e.name, "caption": e.caption} for e in examples]


def write_shard(path: Path, parts: list, dtype: str) -> None:
    def write(tmp: Path) -> None:
        tmp.mkdir()
        for i, name in enumerate(ARRAYS):
            np.save(tmp / f"{name}.npy", np.concatenate([arrays[i] for arrays, _ in parts]).astype(dtype))
        (tmp / EXAMPLES).write_text(json.dumps([e for _, examples in parts for e in examples], indent=0) + "\n")

    write_atomically(path, write)


def remove_stale(path: Path, name: str) -> None:
    """The temporary files of ``name`` that a killed run left."""
    for stale in path.glob(f".{name}.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()


def build_latent_cache(source, pipeline: StableDiffusion, path: str | Path, *, model: str, shard_size: int,
                       batch_size: int, dtype: str = "float32", process_index: int = 0, process_count: int = 1,
                       log_every_s: float = 30.0) -> Path:
    """Encodes into ``path`` the shards of ``source`` (``data.captions``) that this process writes and that are not
    on disk yet, logging images/s and the ETA; ``model`` (the pipeline's directory) is recorded. A cache in
    ``path`` made from another spec (encoders, data, resolution, crop, layout) is refused, naming what differs.
    The last batch of a shard is padded, so every batch runs one compiled program."""
    check_cache_options(pipeline, source.description["resolution"], shard_size, batch_size, dtype)
    path = Path(path)
    empty_text = np.asarray(encode_prompts(pipeline, [""] * batch_size))[0]
    latent = source.description["resolution"] // pipeline.vae_scale_factor
    spec = {"fingerprint": weights_fingerprint(pipeline), "source": source.description, "num_examples": len(source),
            "shard_size": shard_size, "dtype": dtype, "latent_shape": [latent, latent, pipeline.vae.latent_channels],
            "text_shape": list(empty_text.shape), "scaling_factor": pipeline.vae.scaling_factor,
            "shift_factor": pipeline.vae.shift_factor}
    index = read_index(path)
    if index is not None and index["spec"] != spec:
        raise ValueError(
            f"The latent cache in {path} was made from other inputs (model {index['model']}) than this run's (model "
            f"{model}): {'; '.join(differences(index['spec'], spec))}. To cache these, delete {path} or set "
            "config.cache.dir to another directory; to finish that cache, run with its config.")
    path.mkdir(parents=True, exist_ok=True)
    num_shards = math.ceil(len(source) / shard_size)
    if process_index == 0:
        for name in (INDEX, EMPTY_TEXT):
            remove_stale(path, name)
        if index is None:
            write_json(path / INDEX, {"format": FORMAT, "model": model, "num_shards": num_shards, "spec": spec})
        if not (path / EMPTY_TEXT).is_file():
            write_atomically(path / EMPTY_TEXT, lambda tmp: save_array(tmp, empty_text.astype(dtype)))
    shards = [k for k in range(process_index, num_shards, process_count) if not (path / shard_name(k)).is_dir()]
    plan = []  # (shard, rows of one batch)
    for k in shards:
        remove_stale(path, shard_name(k))
        rows = range(k * shard_size, min((k + 1) * shard_size, len(source)))
        plan += [(k, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    total = sum(len(rows) for _, rows in plan)
    logging.info("Caching %d examples in %d shards of %d into %s; this process encodes %d shards (%d examples).",
                 len(source), num_shards, shard_size, path, len(shards), total)
    parts, done, start = [], 0, time.perf_counter()
    last_log = compiled = None  # (time, examples done) after the first batch, which compiles: the rate starts there
    for (k, rows), examples in zip(plan, load_ahead(source, [rows for _, rows in plan])):
        parts.append(encode_batch(pipeline, examples, batch_size))
        if rows.stop == min((k + 1) * shard_size, len(source)):  # the shard's last batch
            write_shard(path / shard_name(k), parts, dtype)
            parts = []
        done += len(rows)
        now = time.perf_counter()
        compiled = compiled or (now, done)
        if done > compiled[1] and now - (last_log or compiled[0]) >= log_every_s and done < total:
            rate = (done - compiled[1]) / (now - compiled[0])
            logging.info("Cached %d/%d examples (%.0f%%): %.1f images/s, ETA %s.", done, total, 100 * done / total,
                         rate, format_seconds((total - done) / rate))
            last_log = now
    elapsed = time.perf_counter() - start
    on_disk = sum((path / shard_name(k)).is_dir() for k in range(num_shards))
    logging.info("Encoded %d examples in %s (%.1f images/s); %d of %d shards are on disk in %s.", total,
                 format_seconds(elapsed), total / max(elapsed, 1e-9), on_disk, num_shards, path)
    return path


class LatentCache:
    """A complete cache, read by index: its shards are memory-mapped as they are first needed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = read_index(self.path)
        if index is None or index.get("format") != FORMAT:
            raise FileNotFoundError(f"No latent cache at {self.path} ({INDEX} is missing or not {FORMAT}): make one "
                                    "with `deme cache-latents --config=... --workdir=...`.")
        missing = [shard_name(k) for k in range(index["num_shards"]) if not (self.path / shard_name(k)).is_dir()]
        if missing or not (self.path / EMPTY_TEXT).is_file():
            raise ValueError(f"The latent cache in {self.path} is incomplete ({len(missing)} of {index['num_shards']} "
                             "shards missing): run `deme cache-latents` with its config again to finish it.")
        self.index, self.spec = index, index["spec"]
        self.empty_text = np.load(self.path / EMPTY_TEXT).astype(np.float32)
        self._shards: dict[int, dict[str, np.ndarray]] = {}
        # Prefetch threads open shards; CPython 3.11's ast.literal_eval (which parses each .npy header) is not
        # thread-safe ("AST constructor recursion depth mismatch"), so one thread opens a shard at a time.
        self._opening = threading.Lock()

    def __len__(self) -> int:
        return self.spec["num_examples"]

    def shard(self, k: int) -> dict[str, np.ndarray]:
        with self._opening:
            if k not in self._shards:
                self._shards[k] = {a: np.load(self.path / shard_name(k) / f"{a}.npy", mmap_mode="r") for a in ARRAYS}
            return self._shards[k]

    def rows(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 (posterior mean, posterior std, text states) of the examples ``indices``."""
        size = self.spec["shard_size"]
        rows = [self.shard(int(i) // size) for i in indices]
        return tuple(np.stack([r[a][int(i) % size] for r, i in zip(rows, indices)]).astype(np.float32)
                     for a in ARRAYS)


def open_latent_cache(path: str | Path, pipeline_or_fingerprint: StableDiffusion | str) -> LatentCache:
    """The complete cache in ``path``, if the VAE and text encoder of ``pipeline_or_fingerprint`` (a pipeline, or its
    ``weights_fingerprint``) made it."""
    fingerprint = pipeline_or_fingerprint if isinstance(pipeline_or_fingerprint, str) else \
        weights_fingerprint(pipeline_or_fingerprint)
    cache = LatentCache(path)
    if cache.spec["fingerprint"] != fingerprint:
        raise ValueError(
            f"The latent cache in {cache.path} was encoded by another VAE and text encoder (fingerprint "
            f"{cache.spec['fingerprint']}, from {cache.index['model']}) than this model's (fingerprint {fingerprint}). "
            "Run `deme cache-latents` with this model (config.deme.pretrained) into a new config.cache.dir.")
    return cache


class LatentStream(BatchStream):
    """Shuffled global batches of a latent cache, split over processes, resuming as ``data.BatchStream`` does (the
    same order for the same seed).

    A batch is ``{"latents": (b, h, w, c), "text": (b, 77, D)}``, float32: each row a latent drawn from its posterior,
    ``(mean + std * eps - shift_factor) * scaling_factor``, and its caption's text states, replaced by the empty
    caption's with probability ``caption_dropout`` (for classifier-free guidance). ``eps`` and the dropout of global
    row r of step k are drawn from (seed, k, r), so the global batch does not depend on the number of processes.
    """

    def __init__(self, cache: LatentCache, global_batch_size: int, *, seed: int | tuple[int, ...],
                 caption_dropout: float, process_index: int = 0, process_count: int = 1, start_step: int = 0,
                 prefetch: int = 4):
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"config.data.caption_dropout={caption_dropout} must lie in [0, 1].")
        super().__init__(cache, global_batch_size, seed=seed, process_index=process_index,
                         process_count=process_count, start_step=start_step, prefetch=prefetch)
        self.caption_dropout = caption_dropout

    def batch(self, step: int) -> dict[str, np.ndarray]:
        first = self.process_index * self.local_batch_size
        indices = self.global_indices(step)[first:first + self.local_batch_size]
        seeds = [(*self.seed, ROW_DRAWS, step, first + row) for row in range(len(indices))]
        return draw_examples(self.source, indices, seeds, self.caption_dropout)


def draw_examples(cache: LatentCache, indices, row_seeds, caption_dropout: float = 0.0) -> dict[str, np.ndarray]:
    """``{"latents", "text"}`` of the examples ``indices``, float32: each latent drawn from its posterior with its
    row's seed (a numpy ``SeedSequence`` entropy), ``(mean + std * eps - shift_factor) * scaling_factor``, and its
    text states, the empty caption's with probability ``caption_dropout``."""
    mean, std, text = cache.rows(indices)
    eps, dropped = np.empty_like(mean), np.empty(len(mean), bool)
    for row, seed in enumerate(row_seeds):
        rng = np.random.default_rng(seed)
        dropped[row] = rng.random() < caption_dropout
        eps[row] = rng.standard_normal(mean.shape[1:], np.float32)
    text[dropped] = cache.empty_text
    spec = cache.spec
    latents = (mean + std * eps - (spec["shift_factor"] or 0.0)) * spec["scaling_factor"]
    return {"latents": latents, "text": text}
