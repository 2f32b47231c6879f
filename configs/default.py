"""Every knob of a deme-jax training run, with its default.

Experiment configs import this and change a few fields; any field can also be
set on the command line: ``deme pretrain --config=configs/mnist_tiny.py
--config.train.num_steps=100 --workdir=/tmp/run``.
"""

from deme_jax.defaults import training_config as get_config  # noqa: F401
