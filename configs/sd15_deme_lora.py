"""DeMe on Stable Diffusion v1.4/v1.5 with LoRA replicas: configs/sd15_deme.py, but each replica trains rank-64
adapters on every attention projection (and DeMe's channel projections in full), so N=4 replicas stack on one
80-GB GPU: they share the frozen pretrained UNet, which is also the teacher.

    deme finetune --config=configs/sd15_deme_lora.py --workdir=/runs/sd15_deme_lora \
        --config.deme.pretrained=/models/stable-diffusion-v1-4 --config.data.folder=/data/laion_aes65
    deme merge --config=configs/sd15_deme_lora.py --workdir=/runs/sd15_deme_lora

The caches are those of configs/sd15_deme.py (same data, same encoders): point config.cache.dir at them.
Task vectors are the adapters' dense deltas (scale * A B), so merging is unchanged; the merge is exported as a
full pipeline, and, for task arithmetic without channel projections (--config.deme.channel_projection=False), also
as one LoRA file in the diffusers/peft layout (rank N x 64).
LoRA is the paper's suggestion, not its experiment: the learning rate (1e-4, usual for LoRA) is ours.
"""

from configs import sd15_deme


def get_config():
    config = sd15_deme.get_config()
    config.deme.update(dict(lora=True, lora_rank=64, lora_targets=("attention",)))
    config.optim.lr = 1e-4
    return config
