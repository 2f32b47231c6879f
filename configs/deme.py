"""DeMe finetuning and merging: the reference recipe's settings, which the *_deme.py configs build on.

    deme finetune --config=configs/<name>_deme.py --workdir=DIR   # N replicas, each on its interval
    deme merge --config=configs/<name>_deme.py --workdir=DIR      # weight search, DIR/merge/{orbax,diffusers}

The model is read from config.deme.pretrained (an orbax checkpoint, a diffusers
directory or a training workdir), so these configs have no `model` block.
Every field, with what it does, is in deme_jax/defaults.py (``deme_config``:
config.deme, config.merge, and the training blocks of ``training_config``).
"""

from deme_jax import defaults


def get_config():
    return defaults.deme_config()
