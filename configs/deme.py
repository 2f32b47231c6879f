"""DeMe finetuning and merging: the reference recipe's settings, which the *_deme.py configs build on.

    deme finetune --config=configs/<name>_deme.py --workdir=DIR   # N replicas, each on its interval
    deme merge --config=configs/<name>_deme.py --workdir=DIR      # weight search, DIR/merge/{orbax,diffusers}

The model is read from config.deme.pretrained (an orbax checkpoint, a diffusers
directory or a training workdir), so these configs have no `model` block.
Fields: config.deme (see deme_jax.deme.default_deme_config), config.merge (see
deme_jax.deme.default_merge_config), and the training blocks of configs/default.py.
"""

from configs import default
from deme_jax.deme import default_deme_config, default_merge_config


def get_config():
    config = default.get_config()
    del config["model"]
    config.deme = default_deme_config()
    config.merge = default_merge_config()
    # The reference: AdamW lr 5e-5 constant without warm-up, betas (0.95, 0.999), weight decay 1e-6, clip 1.0.
    config.optim.update(dict(lr=5e-5, schedule="constant", warmup_steps=0, b1=0.95, b2=0.999, eps=1e-8,
                             weight_decay=1e-6, grad_clip=1.0))
    # EMA with warm-up, inv_gamma 1, power 3/4, at most 0.9999: the EMA weights are merged.
    config.ema.update(dict(max_decay=0.9999, inv_gamma=1.0, power=0.75))
    return config
