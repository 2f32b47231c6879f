"""The defaults of a training run: the CIFAR-10 DDPM of Ho et al.

Every field, with what it does, is in deme_jax/defaults.py (``training_config``),
which lives in the package so that installed commands need no configs/ directory.
Experiment configs import this file and change a few fields; any field can also
be set on the command line: ``deme pretrain --config=configs/mnist_tiny.py
--config.train.num_steps=100 --workdir=/tmp/run``.
"""

from deme_jax import defaults


def get_config():
    return defaults.training_config()
