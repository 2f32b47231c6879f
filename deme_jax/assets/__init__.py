"""Files that ship with the package: the tiny pretrained MNIST DDPM of `deme demo`."""

from pathlib import Path

# diffusers directory written by `deme convert` from a configs/mnist16_pretrain.py run.
MNIST16_DDPM = Path(__file__).parent / "mnist16_ddpm"
# FD-MNIST's digit classifier, written by `python -m deme_jax.metrics.mnist_features`.
MNIST_CLASSIFIER = Path(__file__).parent / "mnist_classifier.safetensors"
