"""`config.data` -> sources, training streams, held-out and reference images (fields: deme_jax.defaults)."""

from __future__ import annotations

import ml_collections
import numpy as np

from deme_jax.data.sources import FolderSource, TfdsSource, mnist_source, tfds_builder
from deme_jax.data.stream import BatchStream, to_model_range
from deme_jax.images import to_uint8


def make_source(data: ml_collections.ConfigDict, split: str | None = None):
    """The random-access source that `data` names; `split` overrides `data.split`."""
    split = data.split if split is None else split
    if data.name == "mnist":
        return mnist_source(split, data.image_size, data.channels)
    if data.name == "folder":
        if split == "heldout" and data.heldout_folder:
            return FolderSource(data.heldout_folder, data.image_size, data.channels, "all", 0.0, data.skip_unreadable)
        fraction = 0.0 if data.heldout_folder else data.heldout_fraction
        return FolderSource(data.folder, data.image_size, data.channels, split, fraction, data.skip_unreadable)
    return TfdsSource(data.name, split, data.tfds_data_dir, data.image_size, data.channels)


def make_stream(
    data: ml_collections.ConfigDict,
    global_batch_size: int,
    seed: int | tuple[int, ...],
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
) -> BatchStream:
    """The training stream of this process: `jax.process_index()` / `jax.process_count()` on multi-host."""
    return BatchStream(
        make_source(data),
        global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        random_flip=data.random_flip,
        start_step=start_step,
    )


def heldout_images(data: ml_collections.ConfigDict, n: int | None = None) -> np.ndarray:
    """The first `n` (default all) held-out images, float32 NHWC in [-1, 1], for evaluation.

    MNIST: the fixed 500-digit held-out split, class-balanced in any prefix.
    TFDS: the `test` split, else `validation`, in stored order. Image folders:
    `data.heldout_folder`, else the `data.heldout_fraction` of the folder that
    training never sees.
    """
    if data.name in ("mnist", "folder"):
        source = make_source(data, "heldout")
    else:
        splits = tfds_builder(data.name, data.tfds_data_dir).info.splits
        split = next((s for s in ("test", "validation") if s in splits), None)
        if split is None:
            raise ValueError(f"config.data.name={data.name!r} has no test or validation split ({sorted(splits)})")
        source = make_source(data, split)
    n = len(source) if n is None else n
    if not 0 < n <= len(source):
        more = " (or raise config.data.heldout_fraction, or give config.data.heldout_folder)" * (data.name == "folder")
        raise ValueError(f"asked for {n} held-out images of {data.name!r}, which has {len(source)}: ask for fewer "
                         f"(config.eval.num_images, config.evaluate.num_reference){more}.")
    return to_model_range(np.stack([source[i] for i in range(n)]))


def reference_images(reference: str, data_config, num: int = 0) -> np.ndarray:
    """uint8 reference images: config.data's held-out or training split, or an image folder."""
    if reference == "heldout":
        return to_uint8(heldout_images(data_config, num or None))
    if reference == "train":
        source = make_source(data_config)
        count = num or len(source)
        order = np.random.default_rng(0).permutation(len(source))[:count]  # sources may be sorted by class
        return np.stack([source[int(i)] for i in order])
    folder = ml_collections.ConfigDict(dict(data_config))
    folder.update(dict(name="folder", folder=reference, heldout_fraction=0.0, heldout_folder=""))
    source = make_source(folder)
    return np.stack([source[i] for i in range(num or len(source))])


def training_batches(data_config, num_batches: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """``num_batches`` fixed batches of distinct training images in model range, in a seeded order."""
    source = make_source(data_config)
    order = np.random.default_rng(seed).permutation(len(source))
    return [to_model_range(np.stack([source[int(i)] for i in order[k * batch_size:(k + 1) * batch_size]]))
            for k in range(num_batches)]
