"""diffusers ``UNet2DConditionModel`` config.json <-> ``UNet2DCondition`` fields.

Weights go through ``torch_layout``: ``load_pretrained(model_dir,
model_from_config, WEIGHTS_NAME)`` reads a model directory (a pipeline's
``unet/``), ``save_pretrained(params, model_to_config(model), path, WEIGHTS_NAME)``
writes one that diffusers' ``UNet2DConditionModel.from_pretrained`` loads.
A model with DeMe's channel projections adds ``"channel_projection": true`` and
one ``(C, C, 1, 1)`` tensor per projection (``down_blocks.0.channel_projection.weight``,
..., ``mid_block.``, ``up_blocks.i.``); stock diffusers does not apply them.
"""

from __future__ import annotations

from deme_jax.models.unet_condition import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, UNet2DCondition

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "UNet2DConditionModel"
MODEL_CLASS = UNet2DCondition

# diffusers config keys that map one-to-one onto UNet2DCondition fields.
MODEL_KEYS = (
    "sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
    "down_block_types", "up_block_types", "block_out_channels", "layers_per_block", "downsample_padding",
    "mid_block_scale_factor", "dropout", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "use_linear_projection",
    "upcast_attention", "time_embedding_dim",
)
# Fields diffusers takes as one value for every block or a list with one per block.
PER_BLOCK_KEYS = ("transformer_layers_per_block", "attention_head_dim", "num_attention_heads")
# diffusers config keys whose other values select layers UNet2DCondition does not have (SDXL's added
# embeddings, class embeddings, GLIGEN, dual or cross-only attention, scale-shift resnets, ...).
FIXED_KEYS = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu", "swish"),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "attention_type": ("default",),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "projection_class_embeddings_input_dim": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
}
# Read only by block types and embeddings refused above (SimpleCrossAttn blocks, text addition embeddings).
UNUSED_KEYS = ("resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm",
               "mid_block_only_cross_attention", "addition_embed_type_num_heads")
# Written only when true: DeMe's 1x1 channel projections, weights "<block>.channel_projection.weight".
PROJECTION_KEY = "channel_projection"


# unet/config.json of runwayml/stable-diffusion-v1-5 (as CompVis/stable-diffusion-v1-4).
SD15_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
# unet/config.json of stabilityai/stable-diffusion-2-1.
SD21_CONFIG = dict(
    SD15_CONFIG, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, dual_cross_attention=False,
    num_class_embeds=None, only_cross_attention=False, sample_size=96, upcast_attention=True,
    use_linear_projection=True,
)


def model_from_config(config: dict) -> UNet2DCondition:
    """Builds the UNet2DCondition a diffusers ``config.json`` describes, refusing what it cannot express."""
    class_name = config.get("_class_name", CLASS_NAME)
    if class_name != CLASS_NAME:
        raise ValueError(f"UNet config _class_name={class_name!r} is not supported here; only {CLASS_NAME!r} is.")
    for key, value in config.items():
        if key.startswith("_") or key in MODEL_KEYS or key in UNUSED_KEYS or key == PROJECTION_KEY:
            continue
        if key not in FIXED_KEYS:
            raise ValueError(f"UNet config key {key!r} (= {value!r}) is not supported by deme_jax's UNet2DCondition; "
                             f"supported keys: {', '.join(MODEL_KEYS + tuple(FIXED_KEYS) + UNUSED_KEYS)}.")
        if value not in FIXED_KEYS[key]:
            raise ValueError(f"UNet config {key}={value!r} is not supported; supported values: "
                             f"{', '.join(map(repr, FIXED_KEYS[key]))}. Only Stable Diffusion 1.x/2.x layouts "
                             "(text cross-attention, positional time embedding, no added embeddings) can be loaded.")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in MODEL_KEYS}
    n = len(fields.get("block_out_channels", UNet2DCondition.block_out_channels))
    for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        types = fields.get(key, getattr(UNet2DCondition, key))
        bad = [b for b in types if b not in allowed]
        if bad:
            raise ValueError(f"UNet config {key} contains {bad}; supported block types: {', '.join(allowed)}.")
        if len(types) != n:
            raise ValueError(f"UNet config {key} has {len(types)} entries but block_out_channels has {n}; "
                             "give one block type per resolution level.")
    for key in ("layers_per_block", "cross_attention_dim", "norm_num_groups"):
        if not isinstance(fields.get(key, 1), int):
            raise ValueError(f"UNet config {key}={config[key]!r} is not supported; give one integer for all blocks.")
    for key in PER_BLOCK_KEYS:
        value = fields.get(key)
        if isinstance(value, tuple) and (len(value) != n or not all(isinstance(v, int) for v in value)):
            raise ValueError(f"UNet config {key}={config[key]!r} is not supported; give one integer for all blocks "
                             f"or one integer per block ({n} blocks).")
    return UNet2DCondition(**fields, channel_projection=bool(config.get(PROJECTION_KEY, False)))


def model_to_config(model: UNet2DCondition) -> dict:
    """The diffusers ``config.json`` of a UNet2DCondition.

    diffusers refuses ``num_attention_heads``, so the head counts go into
    ``attention_head_dim``, which diffusers reads as head counts.
    """
    config = {"_class_name": CLASS_NAME}
    for key in MODEL_KEYS:
        value = getattr(model, key)
        config[key] = list(value) if isinstance(value, tuple) else value
    config["attention_head_dim"] = config.pop("num_attention_heads") or config["attention_head_dim"]
    config["num_attention_heads"] = None
    config.update({key: values[0] for key, values in FIXED_KEYS.items()})
    if model.channel_projection:
        config[PROJECTION_KEY] = True
    return config
