"""``deme pretrain --config=FILE --workdir=DIR``: trains a DDPM from scratch, resuming from DIR's checkpoints."""

from deme_jax.train import train_and_evaluate


def run(config, workdir):
    return train_and_evaluate(config, workdir)
