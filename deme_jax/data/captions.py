"""Image-caption pairs for text-to-image finetuning: an image folder with its captions, or a TFDS dataset.

A source has ``len(source)``, ``source[i]`` -> ``Example(image, caption, name)`` with the image as uint8
(R, R, 3) RGB, and ``source.description``: what the pairs are, for the index of the latent cache made from them.
Images are resized and cropped as diffusers' ``train_text_to_image.py`` does it (torchvision's ``Resize`` on the
shorter side, bilinear, then ``CenterCrop`` or ``RandomCrop``), so the latents are those a diffusers finetune of
the same pipeline encodes. Images in another mode (grayscale, palette, RGBA, CMYK) are converted to RGB, the alpha
dropped, as those scripts do.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from deme_jax.data.sources import check_image_size, folder_images, readable_images, tfds_builder

# A folder's captions come from one of these files, else from a name.txt beside each image. metadata.jsonl is the
# layout of Hugging Face's imagefolder datasets, with the same keys.
CAPTION_FILES = ("captions.jsonl", "metadata.jsonl")
LISTED = 10  # names an error lists before "..."


class Example(NamedTuple):
    image: np.ndarray  # uint8 (R, R, 3)
    caption: str
    name: str  # the image's path in its folder, or its TFDS file name (else split[index])


def fit_caption_image(image: Image.Image, resolution: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """torchvision's ``Resize(resolution, BILINEAR)`` then ``CenterCrop(resolution)``, or ``RandomCrop`` with offsets
    drawn from ``rng``, on a PIL image, as uint8 RGB.

    Resize scales the shorter side to ``resolution`` and the longer one to ``int(resolution * long / short)``
    (truncated, as torchvision computes it) with PIL's bilinear filter, which antialiases when it shrinks; the
    center crop's offsets are ``round((side - resolution) / 2)``.
    """
    image = image.convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short != resolution:
        long = int(resolution * long / short)
        image = image.resize((resolution, long) if width <= height else (long, resolution), Image.Resampling.BILINEAR)
        width, height = image.size
    if rng is None:
        top, left = round((height - resolution) / 2), round((width - resolution) / 2)
    else:
        top, left = int(rng.integers(0, height - resolution + 1)), int(rng.integers(0, width - resolution + 1))
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)), np.uint8)


def listed(names: list[str]) -> str:
    return ", ".join(names[:LISTED]) + (" ..." if len(names) > LISTED else "")


class CaptionSource:
    """What both sources share: the resolution, the crop, and the image -> array step."""

    def __init__(self, resolution: int, upscale: bool, crop_seed: tuple[int, ...] | None):
        check_image_size(resolution)
        self.resolution, self.upscale, self.crop_seed = resolution, upscale, crop_seed

    def too_small(self, size: tuple[int, int]) -> bool:
        return min(size) < self.resolution and not self.upscale

    def fit(self, image: Image.Image, index: int) -> np.ndarray:
        """The crop of example ``index`` is drawn from (crop_seed, index), so it is the same on every run."""
        rng = None if self.crop_seed is None else np.random.default_rng([*self.crop_seed, index])
        return fit_caption_image(image, self.resolution, rng)

    def fit_description(self) -> dict:
        return {"resolution": self.resolution, "crop": "center" if self.crop_seed is None else "random",
                "crop_seed": None if self.crop_seed is None else list(self.crop_seed)}


def read_caption_file(path: Path) -> dict[str, str]:
    """``{"file_name": ..., "text": ...}`` per line -> file name (relative to the folder) -> caption."""
    captions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name, text = PurePosixPath(record["file_name"]).as_posix(), record["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}, line {number}: expected {{\"file_name\": ..., \"text\": ...}}, got "
                             f"{line[:200]!r} ({type(err).__name__}: {err})") from None
        if not isinstance(text, str):
            raise ValueError(f"{path}, line {number}: the caption of {name!r} is {text!r}, not a string")
        if name in captions:
            raise ValueError(f"{path}, line {number}: {name!r} has a caption on an earlier line already")
        captions[name] = text
    return captions


class CaptionFolder(CaptionSource):
    """The images under a folder (as ``FolderSource`` finds them: recursively, sorted, ``heldout_fraction`` held
    out by a hash of each path) with a caption each: from the folder's ``captions.jsonl`` (or ``metadata.jsonl``),
    else from ``name.txt`` beside ``name.jpg``.

    Everything that would stop caching half-way is found at start: an image without a caption or a caption without
    an image (each listed, with how many), an image that does not decode (``skip_unreadable``: left out and
    counted), and an image smaller than ``resolution`` on its shorter side (unless ``upscale``).
    """

    def __init__(self, root: str, resolution: int, part: str = "all", heldout_fraction: float = 0.0,
                 skip_unreadable: bool = False, upscale: bool = False, crop_seed: tuple[int, ...] | None = None):
        super().__init__(resolution, upscale, crop_seed)
        names = folder_images(root, part, heldout_fraction)
        self.root = Path(root)
        captions, kind = self.read_captions(names)
        paths, infos = readable_images(root, [self.root / n for n in names], skip_unreadable)
        small = [f"{p.relative_to(self.root).as_posix()} ({w}x{h})" for p, ((w, h), _) in zip(paths, infos)
                 if self.too_small((w, h))]
        if small:
            raise ValueError(
                f"{len(small)} of the {len(paths)} images in {root} are smaller than config.data.image_size="
                f"{resolution} on their shorter side: {listed(small)}. Use larger images, lower "
                "config.data.image_size, or set config.data.upscale=True to upscale them (bilinear).")
        modes = Counter(mode for _, mode in infos if mode != "RGB")
        if modes:
            logging.info("Converting %d images in %s to RGB (modes %s), alpha dropped.", sum(modes.values()), root,
                         dict(modes))
        self.names = [p.relative_to(self.root).as_posix() for p in paths]
        self.captions = [captions[n] for n in self.names]
        listing = hashlib.sha256()
        for path, name, caption in zip(paths, self.names, self.captions):
            listing.update(json.dumps([name, path.stat().st_size, caption]).encode() + b"\n")
        self.description = {"kind": "folder", "root": str(self.root.absolute()), "captions": kind,
                            "part": part, "heldout_fraction": heldout_fraction, "listing_sha256": listing.hexdigest(),
                            **self.fit_description()}

    def read_captions(self, names: list[str]) -> tuple[dict[str, str], str]:
        """The caption of every image in ``names`` and where they come from (a caption file's name, or "txt");
        refuses images without one and captions without an image."""
        files = [self.root / f for f in CAPTION_FILES if (self.root / f).is_file()]
        if len(files) > 1:
            raise ValueError(f"{self.root} holds both {' and '.join(f.name for f in files)}: keep one caption file.")
        if files:
            kind, captions = files[0].name, read_caption_file(files[0])
            orphans = sorted(n for n in captions if not (self.root / n).is_file())
            where = f"no line in {files[0]}"
        else:
            kind = "txt"
            captions = {n: (self.root / n).with_suffix(".txt").read_text(encoding="utf-8").strip() for n in names
                        if (self.root / n).with_suffix(".txt").is_file()}
            stems = {PurePosixPath(n).with_suffix("") for n in folder_images(str(self.root))}
            orphans = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*.txt")
                             if PurePosixPath(p.relative_to(self.root).as_posix()).with_suffix("") not in stems)
            where = "no name.txt beside name.jpg, and no captions.jsonl in the folder"
        if orphans:
            raise ValueError(f"{len(orphans)} captions in {self.root} name no image: {listed(orphans)}. Remove them "
                             "or add their images (png/jpg/jpeg/webp).")
        missing = [n for n in names if n not in captions]
        if missing:
            raise ValueError(f"{len(missing)} of the {len(names)} images in {self.root} have no caption ({where}): "
                             f"{listed(missing)}. Caption them or move them out of the folder.")
        return captions, kind

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Example:
        with Image.open(self.root / self.names[index]) as image:
            return Example(self.fit(image, index), self.captions[index], self.names[index])


def first_caption(value) -> str | None:
    """The first caption of a TFDS captions feature: ``Sequence({"text": Text})`` (coco_captions), ``Sequence(Text)``
    or ``Text``; None if it holds none."""
    if isinstance(value, dict):
        value = value["text"]
    values = np.atleast_1d(np.asarray(value, dtype=object))
    if not len(values):
        return None
    return values[0].decode("utf-8") if isinstance(values[0], bytes) else str(values[0])


class TfdsCaptions(CaptionSource):
    """The ``image`` and the first caption of ``caption_feature`` of each example of a TFDS split prepared as
    array_record (``coco_captions``: its ``captions``, five per image). One pair per image: the cache then holds
    one text state per image, a fifth of the disk that five would take, and each image is seen once per epoch.

    Images are checked as they are read (decoding all of COCO first would take long): one smaller than
    ``resolution`` stops caching, naming it, unless ``upscale`` (COCO's are mostly 640x480, under SD's 512).
    """

    def __init__(self, name: str, split: str, data_dir: str | None, resolution: int,
                 caption_feature: str = "captions", upscale: bool = False, crop_seed: tuple[int, ...] | None = None):
        super().__init__(resolution, upscale, crop_seed)
        builder = tfds_builder(name, data_dir)
        if caption_feature not in builder.info.features:
            raise ValueError(f"config.data.caption_feature={caption_feature!r} is not a feature of {name} (it has "
                             f"{sorted(builder.info.features)}); coco_captions keeps its captions in 'captions'.")
        self.records = builder.as_data_source(split)
        self.dataset, self.split, self.caption_feature = name, split, caption_feature
        self.description = {"kind": "tfds", "name": name, "version": str(builder.info.version), "split": split,
                            "caption_feature": caption_feature, **self.fit_description()}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        record = self.records[int(index)]
        filename = record.get("image/filename")
        name = filename.decode("utf-8") if isinstance(filename, bytes) else filename or f"{self.split}[{index}]"
        where = f"{name} (example {index} of {self.dataset} {self.split})"
        caption = first_caption(record[self.caption_feature])
        if caption is None:
            raise ValueError(f"{where} has no caption in its {self.caption_feature!r} feature.")
        pixels = np.asarray(record["image"])
        image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        if self.too_small(image.size):
            raise ValueError(f"{where} is {image.size[0]}x{image.size[1]}, smaller than config.data.image_size="
                             f"{self.resolution} on its shorter side: lower config.data.image_size, or set "
                             "config.data.upscale=True to upscale such images (bilinear).")
        return Example(self.fit(image, index), caption, name)


def make_caption_source(data: ml_collections.ConfigDict, crop_seed: tuple[int, ...]):
    """The image-caption pairs of ``config.data`` in its split; ``crop_seed`` draws the crops unless
    ``data.center_crop``."""
    common = dict(resolution=data.image_size, upscale=data.upscale,
                  crop_seed=None if data.center_crop else tuple(crop_seed))
    if data.name == "folder":
        if data.split == "heldout" and data.heldout_folder:
            return CaptionFolder(data.heldout_folder, skip_unreadable=data.skip_unreadable, **common)
        fraction = 0.0 if data.heldout_folder else data.heldout_fraction
        return CaptionFolder(data.folder, part=data.split, heldout_fraction=fraction,
                             skip_unreadable=data.skip_unreadable, **common)
    if data.name == "mnist":
        raise ValueError("config.data.name='mnist' has no captions: use 'folder' (config.data.folder with a caption "
                         "per image) or a TFDS dataset with captions such as 'coco_captions'.")
    return TfdsCaptions(data.name, data.split, data.tfds_data_dir, caption_feature=data.caption_feature, **common)
