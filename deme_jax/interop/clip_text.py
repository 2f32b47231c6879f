"""transformers ``CLIPTextModel`` directories (a diffusers pipeline's ``text_encoder/``) in and out.

Such a directory holds ``config.json`` and ``model.safetensors``. Checkpoints
written by transformers 4 (every Stable Diffusion release) prefix their keys with
``text_model.``, as this model's parameter tree does; transformers 5 writes a
freshly built model without it (and reads both). Loading adds ``KEY_PREFIX``
where it is missing; what is saved from this model carries it, which every
transformers version loads.
"""

from __future__ import annotations

import dataclasses

from deme_jax.models.clip_text import ACTIVATIONS, CLIPTextModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CLASS_NAME = "CLIPTextModel"
MODEL_CLASS = CLIPTextModel
MODEL_TYPE = "clip_text_model"
KEY_PREFIX = "text_model."
# A buffer that transformers before 4.31 saved with the weights.
IGNORED_WEIGHTS = (KEY_PREFIX + "embeddings.position_ids",)

# CLIPTextConfig keys that map one-to-one onto CLIPTextModel fields.
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(CLIPTextModel) if f.name not in ("parent", "name", "dtype"))
# Everything else transformers 5 writes in a CLIPTextModel's full config.json (and torch_dtype, its older name for
# the storage dtype): bookkeeping, output switches, and dropout rates that only training in PyTorch reads.
CONFIG_BOOKKEEPING_KEYS = (
    "transformers_version", "architectures", "model_type", "dtype", "torch_dtype", "initializer_range",
    "initializer_factor", "attention_dropout", "dropout", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
)


def model_from_config(config: dict) -> CLIPTextModel:
    """Builds the CLIPTextModel a transformers ``config.json`` describes, refusing what it cannot express."""
    for key, value in config.items():
        if not (key.startswith("_") or key in MODEL_KEYS or key in CONFIG_BOOKKEEPING_KEYS):
            raise ValueError(f"CLIP text config key {key!r} (= {value!r}) is not supported by deme_jax's "
                             f"CLIPTextModel; supported keys: {', '.join(MODEL_KEYS)}.")
    if config.get("architectures", [CLASS_NAME]) != [CLASS_NAME]:
        raise ValueError(f"CLIP text config architectures={config['architectures']!r}: only {CLASS_NAME} (no "
                         "projection head) is supported.")
    if config.get("hidden_act", CLIPTextModel.hidden_act) not in ACTIVATIONS:
        raise ValueError(f"CLIP text config hidden_act={config['hidden_act']!r} is not supported; supported values: "
                         f"{', '.join(ACTIVATIONS)}.")
    return CLIPTextModel(**{k: config[k] for k in MODEL_KEYS if k in config})


def model_to_config(model: CLIPTextModel) -> dict:
    """The transformers ``config.json`` of a CLIPTextModel."""
    return {"architectures": [CLASS_NAME], "model_type": MODEL_TYPE, **{k: getattr(model, k) for k in MODEL_KEYS}}
