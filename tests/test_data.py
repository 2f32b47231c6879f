import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from deme_jax.data import (
    ArraySource,
    BatchStream,
    heldout_images,
    make_source,
    make_stream,
    mnist_digits,
    mnist_split,
    reference_images,
)
from deme_jax.defaults import data_config

TINY = "tiny_ramps"


def ramp_image(i: int) -> np.ndarray:
    """A smooth 30x40 RGB image, different for each i, so resizing is checkable by averaging."""
    y, x = np.mgrid[:30, :40]
    return np.stack([np.clip(2 * i + 2 * x + 2 * y + 10 * c, 0, 255) for c in range(3)], -1).astype(np.uint8)


def prepare_tiny(data_dir, file_format: str) -> None:
    """Builds a 40-train, 10-test image dataset with TFDS, locally, without registering its class."""
    with tfds.core.registered.skip_registration():

        class TinyRamps(tfds.core.GeneratorBasedBuilder):
            # A dotted module ("tests.test_data") sends tfds's code_path through
            # the importlib_resources backport, which Python >= 3.9 installs lack.
            __module__ = TINY
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self,
                    features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(30, 40, 3))}),
                )

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(range(40)), "test": self._generate_examples(range(40, 50))}

            def _generate_examples(self, ids):
                for i in ids:
                    yield i, {"image": ramp_image(i)}

    TinyRamps.name = TINY
    TinyRamps(data_dir=str(data_dir), file_format=file_format).download_and_prepare()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    prepare_tiny(data_dir, "array_record")
    return str(data_dir)


def config(**fields):
    data = data_config()
    data.update(fields)
    return data


def as_uint8(images):
    return np.round((images + 1) * 127.5).astype(np.uint8)


def sorted_images(images):
    return sorted(np.asarray(image).tobytes() for image in images)


# --- MNIST ---------------------------------------------------------------------


def test_mnist_digits_are_real():
    images, labels = mnist_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    np.testing.assert_array_equal(np.bincount(labels), [500] * 10)
    # Real digits, not noise: class means learned on the train split classify
    # the held-out digits far above chance.
    train, heldout = mnist_split()
    flat = images.reshape(len(images), -1).astype(np.float32)
    means = np.stack([flat[train][labels[train] == c].mean(0) for c in range(10)])
    predicted = ((flat[heldout, None] - means[None]) ** 2).sum(-1).argmin(-1)
    assert (predicted == labels[heldout]).mean() > 0.7


def test_mnist_heldout_split_is_fixed_and_disjoint():
    images, labels = mnist_digits()
    train, heldout = mnist_split()
    assert len(train) == 4500 and len(heldout) == 500
    assert np.intersect1d(train, heldout).size == 0
    assert not set(sorted_images(images[train])) & set(sorted_images(images[heldout]))
    expected = sorted(i for c in range(10) for i in np.flatnonzero(labels == c)[-50:])
    np.testing.assert_array_equal(np.sort(heldout), expected)
    np.testing.assert_array_equal(labels[heldout[:20]], np.tile(np.arange(10), 2))

    held = heldout_images(config(), 30)
    assert held.shape == (30, 32, 32, 1) and held.dtype == np.float32
    np.testing.assert_array_equal(as_uint8(held)[:, 2:30, 2:30, 0], images[heldout[:30]])
    assert np.all(held[:, :2] == -1) and np.all(held[:, :, 30:] == -1)


def test_mnist_stream_from_default_config():
    stream = make_stream(config(), global_batch_size=8, seed=0)
    batch = next(stream)
    stream.close()
    assert batch.shape == (8, 32, 32, 1) and batch.dtype == np.float32
    assert batch.min() == -1 and batch.max() == 1
    rgb = make_source(config(channels=3, image_size=28))
    assert len(rgb) == 4500 and rgb[0].shape == (28, 28, 3)
    np.testing.assert_array_equal(rgb[0][..., 2], mnist_digits()[0][mnist_split()[0][0]])


def test_mnist_shrinks_by_area_average_below_28():
    # 28 -> 14 halves exactly: each pixel is the mean of a 2x2 block (PIL's fixed-point arithmetic: within 1 level).
    small = make_source(config(image_size=14))
    digit = mnist_digits()[0][mnist_split()[0][3]].astype(np.float64)
    blocks = digit.reshape(14, 2, 14, 2).mean(axis=(1, 3))
    assert small[3].shape == (14, 14, 1)
    np.testing.assert_allclose(small[3][..., 0], blocks, atol=1)
    assert make_source(config(image_size=16))[0].shape == (16, 16, 1)


# --- TFDS ----------------------------------------------------------------------


def test_tfds_dataset_loads_by_name_without_its_class(tiny_dir):
    assert type(tfds.builder(TINY, data_dir=tiny_dir)).__name__ == "ReadOnlyBuilder"
    source = make_source(config(name=TINY, tfds_data_dir=tiny_dir, image_size=30, channels=3))
    assert len(source) == 40 and source.shape == (30, 30, 3)
    # The shorter side already fits: only the center crop, pixels unchanged.
    assert sorted_images(source[i] for i in range(40)) == sorted_images(ramp_image(i)[:, 5:35] for i in range(40))

    stream = make_stream(config(name=TINY, tfds_data_dir=tiny_dir, image_size=30, channels=3), 8, seed=3)
    epoch = np.concatenate([next(stream) for _ in range(5)])
    stream.close()
    assert sorted_images(as_uint8(epoch)) == sorted_images(source[i] for i in range(40))
    np.testing.assert_array_equal(epoch[8:16], stream.batch(1))

    held = heldout_images(config(name=TINY, tfds_data_dir=tiny_dir, image_size=30, channels=3))
    assert sorted_images(as_uint8(held)) == sorted_images(ramp_image(i)[:, 5:35] for i in range(40, 50))


def test_tfds_resize_and_grayscale(tiny_dir):
    small = make_source(config(name=TINY, tfds_data_dir=tiny_dir, image_size=15, channels=3))
    gray = make_source(config(name=TINY, tfds_data_dir=tiny_dir, image_size=30, channels=1))
    images = sorted((small[i] for i in range(40)), key=np.mean)
    assert images[0].shape == (15, 15, 3) and gray[0].shape == (30, 30, 1)
    # 40x30 -> 20x15, then columns 2:17, i.e. the original columns 4:34. Halving
    # a ramp averages 2x2 blocks; compare away from the border.
    expected = [ramp_image(i)[:, 4:34].reshape(15, 2, 15, 2, 3).mean((1, 3)) for i in range(40)]
    for got, want in zip(images, expected):
        np.testing.assert_allclose(got[2:-2, 2:-2], want[2:-2, 2:-2], atol=1.5)


def test_tfds_errors(tmp_path, tiny_dir):
    with pytest.raises(ValueError, match=r"config.data.name='not_a_dataset' is not prepared in .*tfds build"):
        make_source(config(name="not_a_dataset", tfds_data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=rf"'cifar10' is not prepared in {tmp_path}"):
        make_source(config(name="cifar10", tfds_data_dir=str(tmp_path)))
    prepare_tiny(tmp_path, "tfrecord")
    with pytest.raises(ValueError, match="tfrecord, which has no random access.*--file_format=array_record"):
        make_source(config(name=TINY, tfds_data_dir=str(tmp_path)))


# --- Image folders -------------------------------------------------------------


def test_folder_reads_images_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    for name in ("b/2.png", "a.png", "b/10.PNG", "c/d/e.webp"):
        image = rng.integers(0, 256, (12, 12, 3), np.uint8)
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / name, lossless=True)
        written[name] = image
    (tmp_path / "notes.txt").write_text("not an image")
    source = make_source(config(name="folder", folder=str(tmp_path), image_size=12, channels=3, heldout_fraction=0.0))
    order = sorted(written)
    assert len(source) == 4 and [p.relative_to(tmp_path).as_posix() for p in source.paths] == order
    for i, name in enumerate(order):
        np.testing.assert_array_equal(source[i], written[name])
    gray = make_source(config(name="folder", folder=str(tmp_path), image_size=12, channels=1, heldout_fraction=0.0))
    expected = np.asarray(Image.fromarray(written["a.png"]).convert("L"))[..., None]
    np.testing.assert_array_equal(gray[0], expected)


def write_digits(folder, count: int, size: int = 8) -> None:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size), np.uint8)).save(folder / f"{i:03d}.png")


def test_folder_holds_out_a_fixed_fraction_that_adding_images_does_not_move(tmp_path):
    write_digits(tmp_path, 200)
    data = config(name="folder", folder=str(tmp_path), image_size=8, channels=1, heldout_fraction=0.1)
    train, heldout = make_source(data), make_source(data, "heldout")
    names = lambda source: {p.name for p in source.paths}  # noqa: E731
    assert names(train).isdisjoint(names(heldout)) and len(names(train) | names(heldout)) == 200
    assert 10 <= len(heldout) <= 30  # about 10%, by a hash of the path
    assert names(make_source(data, "heldout")) == names(heldout)  # the same on every run
    write_digits(tmp_path / "more", 50)
    grown = make_source(data, "heldout")
    assert names(heldout) <= names(grown)  # the new images were assigned; none of the old ones moved
    np.testing.assert_array_equal(heldout_images(data, 5), heldout_images(data, 5))
    # evaluation scores against the same held-out images (as uint8)
    np.testing.assert_array_equal(reference_images("heldout", data, 5), as_uint8(heldout_images(data, 5)))
    # a second folder as the held-out split: the whole first folder trains
    write_digits(tmp_path / "../other", 7)
    data.update(dict(heldout_folder=str(tmp_path / "../other")))
    assert len(make_source(data)) == 250 and len(make_source(data, "heldout")) == 7


def test_unreadable_folder_images_are_found_at_start(tmp_path):
    write_digits(tmp_path, 6)
    (tmp_path / "cut.png").write_bytes((tmp_path / "000.png").read_bytes()[:40])  # a copy cut short
    (tmp_path / "text.jpg").write_text("not an image")
    data = config(name="folder", folder=str(tmp_path), image_size=8, channels=1, heldout_fraction=0.0)
    with pytest.raises(ValueError, match=r"2 of the 8 images in .* cannot be read: .*cut\.png.*text\.jpg.*"
                                         r"config.data.skip_unreadable=True"):
        make_source(data)
    data.skip_unreadable = True
    source = make_source(data)
    assert len(source) == 6 and source[5].shape == (8, 8, 1)


# --- Streams -------------------------------------------------------------------


def indexed_source(n=37):
    """Image i is a left-right asymmetric 2x3 ramp starting at 6i, so rows name their index and flip."""
    return ArraySource((6 * np.arange(n)[:, None] + np.arange(6)).astype(np.uint8).reshape(n, 2, 3, 1))


def test_global_batch_does_not_depend_on_process_count():
    source = indexed_source()
    for flip in (False, True):
        per_count = []
        for count in (1, 2, 4):
            streams = [
                BatchStream(source, 8, seed=5, process_index=p, process_count=count, random_flip=flip)
                for p in range(count)
            ]
            per_count.append([np.concatenate([s.batch(step) for s in streams]) for step in range(12)])
        for batches in per_count[1:]:
            np.testing.assert_array_equal(np.stack(batches), np.stack(per_count[0]))


def test_rows_are_the_indexed_images_flipped_as_drawn():
    source = indexed_source()
    stream = BatchStream(source, 8, seed=1, random_flip=True)
    flips = np.concatenate([stream.global_flips(step) for step in range(40)])
    assert 0.35 < flips.mean() < 0.65
    for step in range(5):
        images = np.stack([source[i] for i in stream.global_indices(step)])
        flipped = stream.global_flips(step)
        images[flipped] = images[flipped, :, ::-1]
        np.testing.assert_array_equal(as_uint8(stream.batch(step)), images)


def test_epochs_are_permutations_that_differ():
    stream = BatchStream(indexed_source(40), 8, seed=2)
    epochs = np.concatenate([stream.global_indices(step) for step in range(10)]).reshape(2, 40)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(40))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0][:8], BatchStream(indexed_source(40), 8, seed=3).global_indices(0))
    # A batch larger than the data set spans several epochs, each a permutation.
    big = BatchStream(indexed_source(3), 9, seed=2).global_indices(0).reshape(3, 3)
    np.testing.assert_array_equal(np.sort(big, axis=1), np.tile(np.arange(3), (3, 1)))


def test_resume_is_exact():
    source = indexed_source()
    stream = BatchStream(source, 4, seed=7, process_index=1, process_count=2, random_flip=True)
    uninterrupted = [next(stream) for _ in range(12)]
    for step, batch in enumerate(uninterrupted):
        np.testing.assert_array_equal(batch, stream.batch(step))

    first = BatchStream(source, 4, seed=7, process_index=1, process_count=2, random_flip=True)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.state()))
    assert state == {"step": 5}
    first.close()
    resumed = BatchStream(source, 4, seed=7, process_index=1, process_count=2, random_flip=True, start_step=state["step"])
    np.testing.assert_array_equal(np.stack([next(resumed) for _ in range(7)]), np.stack(uninterrupted[5:]))
    resumed.restore({"step": 2})
    np.testing.assert_array_equal(next(resumed), uninterrupted[2])
    resumed.close()
    stream.close()


def test_bad_inputs():
    with pytest.raises(ValueError, match="global batch size 10 .* process count 4"):
        BatchStream(indexed_source(), 10, seed=0, process_count=4)
    with pytest.raises(ValueError, match="global batch size 10 .* process count 4"):
        make_stream(config(), 10, seed=0, process_index=1, process_count=4)
    with pytest.raises(ValueError, match=r"config.data.channels=2"):
        make_source(config(channels=2))
    with pytest.raises(ValueError, match=r"config.data.image_size=0"):
        make_source(config(image_size=0))
    with pytest.raises(ValueError, match=r"config.data.split='test'"):
        make_source(config(split="test"))
    with pytest.raises(ValueError, match=r"config.data.folder='/no/such/folder' is not a directory"):
        make_source(config(name="folder", folder="/no/such/folder"))
    with pytest.raises(ValueError, match=r"config.data.heldout_fraction=1.0 must lie in \[0, 1\)"):
        make_source(config(name="folder", folder="/tmp", heldout_fraction=1.0))
