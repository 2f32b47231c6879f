"""FD-MNIST: the shipped digit classifier and the distance in its features."""

import numpy as np
import pytest

from deme_jax.data import heldout_images
from deme_jax.data.input_pipeline import make_source
from deme_jax.defaults import data_config
from deme_jax.data.sources import mnist_digits, mnist_split
from deme_jax.images import to_uint8
from deme_jax.metrics.mnist_features import classify, fd_mnist, load_mnist_features, train_classifier


def digits(image_size, split="train", n=500):
    data = data_config()
    data.image_size = image_size
    if split == "heldout":
        return to_uint8(heldout_images(data, n))
    source = make_source(data)  # in file order, which is sorted by class: take a random subset
    return np.stack([source[i] for i in np.random.default_rng(0).permutation(len(source))[:n]])


def test_shipped_classifier_recognises_held_out_digits():
    images, labels = mnist_digits()
    heldout = mnist_split()[1]
    assert (classify(images[heldout][..., None]) == labels[heldout]).mean() >= 0.96


def test_fd_mnist_separates_real_digits_from_damaged_ones():
    features = load_mnist_features()
    real = features(digits(16, "heldout"))
    assert real.shape == (500, 128)
    train = features(digits(16))
    rng = np.random.default_rng(0)
    noisy = digits(16, "heldout").astype(np.float64) + rng.normal(0, 60, (500, 16, 16, 1))
    damaged = features(np.clip(noisy, 0, 255).astype(np.uint8))
    same_distribution = fd_mnist(real, train)
    assert fd_mnist(train, real) == pytest.approx(same_distribution, rel=1e-9)
    assert fd_mnist(real, damaged) > 5 * same_distribution  # measured: 232 against 34
    assert fd_mnist(real, real) == pytest.approx(0.0, abs=1e-6)


def test_fd_mnist_refuses_what_it_cannot_read():
    features = load_mnist_features()
    with pytest.raises(TypeError, match="uint8"):
        features(np.zeros((2, 16, 16, 1), np.float32))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        features(np.zeros((2, 16, 16, 2), np.uint8))
    with pytest.raises(FileNotFoundError, match="No FD-MNIST classifier"):
        load_mnist_features("/no/such/classifier.safetensors")


def test_the_training_recipe_learns():
    images, labels = mnist_digits()
    train, heldout = mnist_split()
    params = train_classifier(images[train][..., None], labels[train], steps=60)
    from deme_jax.metrics.mnist_features import DigitClassifier, preprocess

    logits = DigitClassifier().apply({"params": params}, preprocess(images[heldout][..., None]))
    assert (np.asarray(logits).argmax(-1) == labels[heldout]).mean() > 0.5
