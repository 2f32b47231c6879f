"""``deme finetune --config=FILE --workdir=DIR``: DeMe's N replicas from config.deme.pretrained, each on its
timestep interval (stacked in one program, or one after another)."""

from deme_jax.deme import finetune


def run(config, workdir):
    return finetune(config, workdir)
