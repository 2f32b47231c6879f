"""DeMe finetuning and merging: the reference recipe's settings, which the *_deme.py configs build on.

    deme finetune --config=configs/<name>_deme.py --workdir=DIR   # N replicas, each on its interval
    deme merge --config=configs/<name>_deme.py --workdir=DIR      # weight search, DIR/merge/{orbax,diffusers}

The model is read from config.deme.pretrained (an orbax checkpoint, a diffusers
directory or a training workdir), so these configs have no `model` block.
Fields: config.deme (see deme_jax.deme.default_deme_config), config.merge (see
deme_jax.deme.default_merge_config), and the training blocks of configs/default.py.
"""

from deme_jax.defaults import deme_config as get_config  # noqa: F401
