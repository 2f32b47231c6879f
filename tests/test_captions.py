"""Image-caption pairs: caption folders (name.txt, captions.jsonl), a TFDS dataset built like coco_captions, the
resize and crop of diffusers' training scripts, and the errors of bad input."""

import json
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from deme_jax.data import CaptionFolder, TfdsCaptions, fit_caption_image, make_caption_source
from deme_jax.defaults import data_config

TINY_COCO = "tiny_coco_captions"
COCO_SIZES = [(40, 30), (30, 45), (16, 16), (24, 20)]  # (width, height) of each example


def pixels(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = np.random.default_rng(seed).integers(0, 256, (height, width, channels), np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def write_folder(root, captions: dict, size=(24, 20)):
    """``captions``: relative image path -> caption, written as name.txt beside each image."""
    for k, (name, caption) in enumerate(sorted(captions.items())):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels(*size, seed=k).save(path)
        path.with_suffix(".txt").write_text(caption + "\n")
    return root


def reference(image: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR).crop(box))


def data(**fields):
    config = data_config()
    config.update({**dict(name="folder", image_size=16, heldout_fraction=0.0), **fields})
    return config


# torchvision's Resize(16) then CenterCrop(16): the longer side int(16 * long / short), offsets round(excess / 2)
# (Python's round: half to even).
@pytest.mark.parametrize("width, height, size, box", [
    (40, 30, (21, 16), (2, 0, 18, 16)),  # 21.33 -> 21; (21 - 16) / 2 = 2.5 -> 2
    (30, 45, (16, 24), (0, 4, 16, 20)),
    (19, 16, (19, 16), (2, 0, 18, 16)),  # already 16 on the shorter side: no resize; 1.5 -> 2
    (10, 12, (16, 19), (0, 2, 16, 18)),  # upscaled: 19.2 -> 19
    (26, 45, (16, 27), (0, 6, 16, 22)),  # 27.69 -> 27 (truncated, not rounded); 5.5 -> 6
])
def test_resize_and_center_crop_are_torchvisions(width, height, size, box):
    image = pixels(width, height, seed=width)
    np.testing.assert_array_equal(fit_caption_image(image, 16), reference(image, size, box))


def test_random_crops_are_drawn_once_per_image(tmp_path):
    write_folder(tmp_path, {f"{i}.png": f"image {i}" for i in range(8)}, size=(40, 16))
    centered = CaptionFolder(str(tmp_path), 16)
    cropped = CaptionFolder(str(tmp_path), 16, crop_seed=(3, 4))
    again = CaptionFolder(str(tmp_path), 16, crop_seed=(3, 4))
    offsets = set()
    for i in range(8):
        image = Image.open(tmp_path / f"{i}.png")
        windows = [np.asarray(image)[:, left:left + 16] for left in range(25)]
        offsets.add(next(left for left, w in enumerate(windows) if np.array_equal(w, cropped[i].image)))
        np.testing.assert_array_equal(cropped[i].image, again[i].image)
        np.testing.assert_array_equal(centered[i].image, windows[12])
    assert len(offsets) > 2  # drawn, not fixed
    assert cropped.description["crop"] == "random" and centered.description["crop"] == "center"


def test_folder_with_a_caption_per_image(tmp_path):
    captions = {"b.png": "a red bird", "a.png": "a cat on a mat", "sub/c.png": "  two dogs  "}
    write_folder(tmp_path, captions, size=(40, 30))
    source = make_caption_source(data(folder=str(tmp_path)), crop_seed=(0,))
    assert len(source) == 3 and source.names == ["a.png", "b.png", "sub/c.png"]
    assert [source[i].caption for i in range(3)] == ["a cat on a mat", "a red bird", "two dogs"]
    for i, name in enumerate(source.names):
        example = source[i]
        assert example.name == name and example.image.dtype == np.uint8
        np.testing.assert_array_equal(example.image, reference(Image.open(tmp_path / name), (21, 16), (2, 0, 18, 16)))
    assert source.description["captions"] == "txt"


def test_folder_with_captions_jsonl(tmp_path):
    write_folder(tmp_path, {"x/1.jpg": "-", "2.png": "-"})
    for path in tmp_path.rglob("*.txt"):
        path.unlink()
    lines = [{"file_name": "2.png", "text": "a boat"}, {"file_name": "./x/1.jpg", "text": "ünïcode “quotes”"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    source = CaptionFolder(str(tmp_path), 16)
    assert [(e.name, e.caption) for e in (source[0], source[1])] == [("2.png", "a boat"),
                                                                      ("x/1.jpg", "ünïcode “quotes”")]
    assert source.description["captions"] == "captions.jsonl"


def test_folder_splits_hold_out_by_path_hash(tmp_path):
    write_folder(tmp_path, {f"{i:03d}.png": f"image {i}" for i in range(60)}, size=(16, 16))
    train = make_caption_source(data(folder=str(tmp_path), heldout_fraction=0.2), (0,))
    heldout = make_caption_source(data(folder=str(tmp_path), heldout_fraction=0.2, split="heldout"), (0,))
    assert set(train.names).isdisjoint(heldout.names) and len(train) + len(heldout) == 60 and 4 <= len(heldout) <= 24
    assert train.description["listing_sha256"] != heldout.description["listing_sha256"]


def test_images_without_captions_and_captions_without_images(tmp_path):
    write_folder(tmp_path, {f"{i}.png": f"image {i}" for i in range(5)})
    (tmp_path / "1.txt").unlink()
    (tmp_path / "3.txt").unlink()
    with pytest.raises(ValueError, match=r"2 of the 5 images in .* have no caption \(no name.txt beside name.jpg.*\): "
                                         r"1.png, 3.png\. Caption them"):
        CaptionFolder(str(tmp_path), 16)
    (tmp_path / "1.txt").write_text("image 1")
    (tmp_path / "3.txt").write_text("image 3")
    (tmp_path / "lost.txt").write_text("an orphan")
    with pytest.raises(ValueError, match=r"1 captions in .* name no image: lost.txt\. Remove them"):
        CaptionFolder(str(tmp_path), 16)
    (tmp_path / "lost.txt").unlink()
    lines = [{"file_name": f"{i}.png", "text": f"image {i}"} for i in (0, 1, 2, 4, 7)]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(ValueError, match=r"1 captions in .* name no image: 7.png"):
        CaptionFolder(str(tmp_path), 16)
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines[:4]))
    with pytest.raises(ValueError, match=r"1 of the 5 images .* have no caption \(no line in .*captions.jsonl\): "
                                         r"3.png"):
        CaptionFolder(str(tmp_path), 16)


@pytest.mark.parametrize("text, message", [
    ('{"file_name": "0.png", "text": "ok"}\nnot json', r"captions.jsonl, line 2: expected"),
    ('{"file_name": "0.png"}', r"line 1: expected .*KeyError"),
    ('{"file_name": "0.png", "text": 3}', r"line 1: the caption of '0.png' is 3, not a string"),
    ('{"file_name": "0.png", "text": "a"}\n{"file_name": "0.png", "text": "b"}', r"line 2: '0.png' has a caption"),
])
def test_malformed_captions_jsonl_names_the_line(tmp_path, text, message):
    write_folder(tmp_path, {"0.png": "-"})
    (tmp_path / "captions.jsonl").write_text(text)
    with pytest.raises(ValueError, match=message):
        CaptionFolder(str(tmp_path), 16)


def test_two_caption_files_are_refused(tmp_path):
    write_folder(tmp_path, {"0.png": "-"})
    for name in ("captions.jsonl", "metadata.jsonl"):
        (tmp_path / name).write_text('{"file_name": "0.png", "text": "a"}')
    with pytest.raises(ValueError, match="holds both captions.jsonl and metadata.jsonl: keep one"):
        CaptionFolder(str(tmp_path), 16)


def test_small_images_are_named_unless_upscaled(tmp_path):
    write_folder(tmp_path, {"big.png": "-"}, size=(20, 16))
    write_folder(tmp_path / "s", {"small.png": "-", "tiny.png": "-"}, size=(15, 30))
    with pytest.raises(ValueError, match=r"2 of the 3 images in .* are smaller than config.data.image_size=16 on "
                                         r"their shorter side: s/small.png \(15x30\), s/tiny.png \(15x30\).*"
                                         r"config.data.upscale=True"):
        CaptionFolder(str(tmp_path), 16)
    source = CaptionFolder(str(tmp_path), 16, upscale=True)
    np.testing.assert_array_equal(source[1].image, reference(Image.open(tmp_path / "s/small.png"), (16, 32),
                                                             (0, 8, 16, 24)))


def test_other_modes_are_converted_to_rgb(tmp_path, caplog):
    images = {"gray.png": pixels(16, 16, 1, "L"), "alpha.png": pixels(16, 16, 2, "RGBA"),
              "palette.png": pixels(16, 16, 3).quantize(16), "cmyk.jpg": pixels(16, 16, 4).convert("CMYK")}
    for name, image in images.items():
        image.save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text(name)
    with caplog.at_level("INFO"):
        source = CaptionFolder(str(tmp_path), 16)
    assert "Converting 4 images" in caplog.text and "'RGBA': 1" in caplog.text
    for i, name in enumerate(source.names):
        np.testing.assert_array_equal(source[i].image, np.asarray(Image.open(tmp_path / name).convert("RGB")))


def test_unreadable_images_follow_skip_unreadable(tmp_path):
    write_folder(tmp_path, {f"{i}.png": f"image {i}" for i in range(4)})
    (tmp_path / "2.png").write_bytes((tmp_path / "2.png").read_bytes()[:50])
    with pytest.raises(ValueError, match=r"1 of the 4 images in .* cannot be read: .*2.png.*skip_unreadable=True"):
        CaptionFolder(str(tmp_path), 16)
    source = CaptionFolder(str(tmp_path), 16, skip_unreadable=True)
    assert source.names == ["0.png", "1.png", "3.png"] and source[2].caption == "image 3"


def test_sources_without_captions_are_refused(tmp_path):
    with pytest.raises(ValueError, match="config.data.name='mnist' has no captions"):
        make_caption_source(data(name="mnist"), (0,))
    with pytest.raises(ValueError, match="config.data.folder='' is not a directory"):
        make_caption_source(data(), (0,))


# --- TFDS ----------------------------------------------------------------------


def prepare_tiny_coco(data_dir) -> None:
    """A 4-train, 1-test dataset with coco_captions' features (image, image/filename, image/id, objects, captions as
    a sequence of {text, id}), built locally with TFDS as array_record."""
    with tfds.core.registered.skip_registration():

        class TinyCocoCaptions(tfds.core.GeneratorBasedBuilder):
            __module__ = TINY_COCO  # see tests/test_data.py: keeps tfds from the importlib_resources backport
            VERSION = tfds.core.Version("1.1.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "image/filename": tfds.features.Text(),
                    "image/id": np.int64,
                    "objects": tfds.features.Sequence({"bbox": tfds.features.BBoxFeature(),
                                                       "label": tfds.features.ClassLabel(num_classes=80)}),
                    "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
                }))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(range(4)), "test": self._generate_examples([4])}

            def _generate_examples(self, ids):
                for i in ids:
                    width, height = COCO_SIZES[i % len(COCO_SIZES)]
                    yield i, {
                        "image": np.asarray(pixels(width, height, seed=10 + i)),
                        "image/filename": f"COCO_{i:012d}.jpg",
                        "image/id": i,
                        "objects": {"bbox": [tfds.features.BBox(0.1, 0.2, 0.5, 0.6)], "label": [i]},
                        "captions": [{"text": f"first caption of {i}", "id": 10 * i},
                                     {"text": f"second caption of {i}", "id": 10 * i + 1}],
                    }

    TinyCocoCaptions.name = TINY_COCO
    TinyCocoCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    prepare_tiny_coco(data_dir)
    return str(data_dir)


def test_tfds_pairs_are_each_image_with_its_first_caption(coco_dir):
    config = data(name=TINY_COCO, tfds_data_dir=coco_dir, split="train", upscale=True)
    source = make_caption_source(config, (0,))
    assert len(source) == 4
    examples = sorted((source[i] for i in range(4)), key=lambda e: e.name)
    for i, example in enumerate(examples):
        assert example.name == f"COCO_{i:012d}.jpg" and example.caption == f"first caption of {i}"
        width, height = COCO_SIZES[i]
        expected = fit_caption_image(pixels(width, height, seed=10 + i), 16)
        np.testing.assert_array_equal(example.image, expected)
    assert source.description == {"kind": "tfds", "name": TINY_COCO, "version": "1.1.0", "split": "train",
                                  "caption_feature": "captions", "resolution": 16, "crop": "center",
                                  "crop_seed": None}


def test_tfds_bad_input(coco_dir):
    source = TfdsCaptions(TINY_COCO, "train", coco_dir, 24)  # two of the four images are under 24 pixels
    refused = []
    for i in range(4):
        try:
            source[i]
        except ValueError as err:
            refused.append(str(err))
    assert len(refused) == 2, refused
    assert any(re.fullmatch(r"COCO_000000000002.jpg \(example \d of tiny_coco_captions train\) is 16x16, smaller than "
                            r"config.data.image_size=24 on its shorter side: .*config.data.upscale=True.*", error)
               for error in refused), refused
    with pytest.raises(ValueError, match=r"config.data.caption_feature='caption' is not a feature of "
                                         r"tiny_coco_captions \(it has \['captions', 'image'"):
        TfdsCaptions(TINY_COCO, "train", coco_dir, 16, caption_feature="caption")
