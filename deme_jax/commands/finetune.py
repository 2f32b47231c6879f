"""``deme finetune --config=FILE --workdir=DIR``: DeMe's N replicas from config.deme.pretrained, each on its
timestep interval (stacked in one program, or one after another); partition="conflict" chooses the intervals from
the pretrained model's gradient conflict first."""

from deme_jax.analysis import gradient_conflict
from deme_jax.deme import finetune


def run(config, workdir):
    return finetune(config, workdir, gradient_conflict)
