"""transformers ``CLIPModel`` directories (openai/clip-vit-large-patch14 and the like) in and out, for the CLIP score.

Such a directory holds ``config.json`` (top-level ``projection_dim`` and
``logit_scale_init_value``, the towers in ``text_config`` and ``vision_config``)
and ``model.safetensors``, keys under ``text_model.`` and ``vision_model.`` plus
the two projections and ``logit_scale``, as transformers 4 and 5 both write them.
Configs saved by transformers 4 (openai's own) repeat every ``PretrainedConfig``
generation setting in each tower's config, which no encoder reads, and may carry
``text_config_dict`` / ``vision_config_dict``, which transformers applies over the
tower's config together with the defaults of every key they leave out; both are
read here as transformers reads them.
"""

from __future__ import annotations

from deme_jax.interop import clip_text
from deme_jax.models.clip import TEXT_KEYS, VISION_KEYS, CLIPModel, CLIPVisionTransformer
from deme_jax.models.clip_text import ACTIVATIONS, CLIPTextModel

WEIGHTS_NAME = "model.safetensors"
CLASS_NAME = "CLIPModel"
MODEL_CLASS = CLIPModel
MODEL_TYPE = "clip"
VISION_MODEL_TYPE = "clip_vision_model"
# Buffers that transformers before 4.31 saved with the weights.
IGNORED_WEIGHTS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

MODEL_KEYS = ("projection_dim", "logit_scale_init_value")
TOWERS = ("text_config", "vision_config")
# PretrainedConfig attributes that transformers 4 wrote into every config: generation settings and flags that CLIP's
# towers never read. (pruned_heads is read: it is accepted only empty.)
LEGACY_KEYS = (
    "add_cross_attention", "bad_words_ids", "begin_suppress_tokens", "cross_attention_hidden_size",
    "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "is_decoder",
    "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams",
    "num_return_sequences", "output_scores", "prefix", "remove_invalid_values", "repetition_penalty",
    "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params", "temperature",
    "tf_legacy_loss", "tie_encoder_decoder", "tie_word_embeddings", "tokenizer_class", "top_k", "top_p", "torchscript",
    "typical_p", "use_bfloat16",
)
# Tower keys CLIPModel does not read: the tower's own projection size (CLIPModel projects to the top-level
# projection_dim), a tower's architectures, and the token ids transformers 4 wrote into the vision config.
TOWER_IGNORED_KEYS = ("projection_dim", "architectures")
VISION_IGNORED_KEYS = TOWER_IGNORED_KEYS + ("bos_token_id", "eos_token_id", "pad_token_id")


def check_keys(config: dict, supported: tuple[str, ...], ignored: tuple[str, ...], what: str) -> None:
    for key, value in config.items():
        if not (key.startswith("_") or key in supported or key in ignored):
            raise ValueError(f"{what} key {key!r} (= {value!r}) is not supported by deme_jax's CLIPModel; supported "
                             f"keys: {', '.join(supported)}.")


def tower_config(config: dict, name: str, defaults: dict) -> dict:
    """``config[name]`` as transformers reads it: ``<name>_dict`` and the defaults of the keys it leaves out
    override it; the generation settings of transformers 4 and an empty ``pruned_heads`` dropped."""
    tower = dict(config.get(name) or {})
    if name + "_dict" in config:
        tower.update({**defaults, **config[name + "_dict"]})
    return {k: v for k, v in tower.items() if k not in LEGACY_KEYS and not (k == "pruned_heads" and not v)}


def model_from_config(config: dict) -> CLIPModel:
    """Builds the CLIPModel a transformers ``config.json`` describes, refusing what it cannot express."""
    check_keys(config, MODEL_KEYS + TOWERS + tuple(t + "_dict" for t in TOWERS), clip_text.CONFIG_BOOKKEEPING_KEYS,
               "CLIP config")
    if config.get("architectures", [CLASS_NAME]) != [CLASS_NAME]:
        raise ValueError(f"CLIP config architectures={config['architectures']!r}: only {CLASS_NAME} is supported.")
    text = tower_config(config, "text_config", {k: getattr(CLIPTextModel, k) for k in TEXT_KEYS})
    text_model = clip_text.model_from_config({k: v for k, v in text.items() if k not in TOWER_IGNORED_KEYS})
    vision = tower_config(config, "vision_config", {k: getattr(CLIPVisionTransformer, k) for k in VISION_KEYS})
    check_keys(vision, VISION_KEYS, clip_text.CONFIG_BOOKKEEPING_KEYS + VISION_IGNORED_KEYS, "CLIP vision_config")
    if vision.get("hidden_act", CLIPVisionTransformer.hidden_act) not in ACTIVATIONS:
        raise ValueError(f"CLIP vision_config hidden_act={vision['hidden_act']!r} is not supported; supported values: "
                         f"{', '.join(ACTIVATIONS)}.")
    return CLIPModel(**{k: config[k] for k in MODEL_KEYS if k in config},
                     **{"text_" + k: getattr(text_model, k) for k in TEXT_KEYS},
                     **{"vision_" + k: vision[k] for k in VISION_KEYS if k in vision})


def model_to_config(model: CLIPModel) -> dict:
    """The transformers ``config.json`` of a CLIPModel."""
    return {
        "architectures": [CLASS_NAME], "model_type": MODEL_TYPE, **{k: getattr(model, k) for k in MODEL_KEYS},
        "text_config": {"model_type": clip_text.MODEL_TYPE, **{k: getattr(model, "text_" + k) for k in TEXT_KEYS}},
        "vision_config": {"model_type": VISION_MODEL_TYPE, **{k: getattr(model, "vision_" + k) for k in VISION_KEYS}},
    }
