"""CLIPModel and the CLIP score against transformers' CLIPModel and torchmetrics' CLIPScore on random weights.

Tolerances: features and logits <= 1e-5 relative L2 in float32, as for the text
encoder (a different summation order gives ~1e-7, a wrong mapping order 1); scores
(100 x cosine) within 1e-4 absolute. Preprocessing equals transformers'
CLIPImageProcessorPil exactly: the resize reproduces Pillow's integer arithmetic.
"""

import copy
import json
from functools import partial

import jax
import numpy as np
import pytest
import torch
import transformers
from torchmetrics.multimodal.clip_score import CLIPScore

from deme_jax.interop.clip import model_from_config, model_to_config
from deme_jax.interop.diffusers import load_diffusers_model, save_diffusers_model
from deme_jax.metrics.clip_score import CLIPScorer, clip_score, preprocess
from deme_jax.models import CLIPModel, build_model, model_fields, param_shapes
from tests.clip_vocab import write_clip_tokenizer

pytestmark = pytest.mark.reference

IMAGE_SIZE = 32
# Towers of different sizes and activations, so that settings crossed between them show. The text tower keeps
# CLIP's vocabulary and context, for the real tokenizer; eos_token_id 2 is openai's legacy "argmax of the ids" pooling.
SMALL = dict(
    projection_dim=16,
    text_config=dict(hidden_size=24, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2,
                     hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1),
    vision_config=dict(hidden_size=32, intermediate_size=41, num_hidden_layers=2, num_attention_heads=4,
                       image_size=IMAGE_SIZE, patch_size=8, hidden_act="gelu", layer_norm_eps=1e-6),
)
# A seed whose pairs score with mixed signs (see test_score_matches_torchmetrics).
SEED = 7
CAPTIONS = ["a photo of a cat", "two dogs playing in the snow", "a red car parked by the sea at night", "x"]
# openai/clip-vit-large-patch14's config.json as transformers 4.16 wrote it (the generation settings abridged).
LEGACY = {
    "_name_or_path": "", "add_cross_attention": False, "architectures": None, "bad_words_ids": None,
    "do_sample": False, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "max_length": 20, "num_beams": 1,
    "pruned_heads": {}, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "torch_dtype": None, "torchscript": False,
    "use_bfloat16": False,
}
VIT_L_14 = {
    "_name_or_path": "clip-vit-large-patch14/", "architectures": ["CLIPModel"], "initializer_factor": 1.0,
    "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": 768,
    "text_config": dict(LEGACY, bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_act="quick_gelu",
                        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                        max_position_embeddings=77, model_type="clip_text_model", projection_dim=768, vocab_size=49408),
    "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                         "num_hidden_layers": 12, "projection_dim": 768},
    "torch_dtype": "float32", "transformers_version": None,
    "vision_config": dict(LEGACY, bos_token_id=None, eos_token_id=None, pad_token_id=None, hidden_act="quick_gelu",
                          hidden_size=1024, image_size=224, intermediate_size=4096, num_attention_heads=16,
                          num_channels=3, num_hidden_layers=24, model_type="clip_vision_model", patch_size=14,
                          projection_dim=768),
    "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                           "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
}


class TensorFeaturesCLIP(transformers.CLIPModel):
    """transformers 5 returns model outputs from get_*_features, where torchmetrics 1.9 expects the projected
    features themselves (Lightning-AI/torchmetrics#3407)."""

    def get_image_features(self, *args, **kwargs):
        return super().get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return super().get_text_features(*args, **kwargs).pooler_output


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def random_clip(seed=SEED) -> transformers.CLIPModel:
    """Every parameter random: layer norms, class and position embeddings and logit_scale included."""
    torch.manual_seed(seed)
    model = transformers.CLIPModel(transformers.CLIPConfig(**copy.deepcopy(SMALL))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = p.shape[-1] ** -0.5 if p.ndim == 2 else 0.1
            p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def save_clip_directory(model: transformers.CLIPModel, path):
    """A directory as the hub has openai's: model, tokenizer and image processor."""
    model.save_pretrained(path)
    write_clip_tokenizer(path)
    size = model.config.vision_config.image_size
    transformers.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}
                                       ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference():
    return random_clip()


@pytest.fixture(scope="module")
def clip_dirs(reference, tmp_path_factory):
    """The model's directory, and that of the model with its text projection negated: every cosine flips sign."""
    negated = random_clip()
    with torch.no_grad():
        negated.text_projection.weight.neg_()
    return {name: save_clip_directory(m, tmp_path_factory.mktemp(name))
            for name, m in (("model", reference), ("negated", negated))}


def images(shape=(4, 40, 48, 3), seed=0) -> np.ndarray:
    """uint8 images, half noise, half smooth (where rounding ties in the resize are frequent)."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, shape, dtype=np.uint8)
    y, x = np.mgrid[:shape[1], :shape[2]]
    for i in range(0, shape[0], 2):
        out[i] = (127.5 + 127.5 * np.sin(x[..., None] / (7 + i) + y[..., None] / 11 + np.arange(3))).astype(np.uint8)
    return out


def test_towers_match_transformers(reference, clip_dirs):
    model, params = load_diffusers_model(clip_dirs["model"])
    assert isinstance(model, CLIPModel)
    pixels = np.random.default_rng(0).standard_normal((3, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    rng = np.random.default_rng(1)
    ids = np.array([[0, *rng.integers(3, 49406, n), 49407] + [1] * (75 - n) for n in (3, 20, 75)], np.int32)
    mask = (np.arange(77) <= np.argmax(ids == 49407, axis=1)[:, None]).astype(np.int32)
    torch_pixels, torch_ids = torch.as_tensor(pixels.transpose(0, 3, 1, 2)), torch.as_tensor(ids, dtype=torch.long)
    with torch.no_grad():
        want_hidden = reference.vision_model(torch_pixels).last_hidden_state.numpy()
        want_image = reference.get_image_features(torch_pixels).pooler_output.numpy()
        want_text = reference.get_text_features(torch_ids, torch.as_tensor(mask)).pooler_output.numpy()
        want_logits = reference(input_ids=torch_ids, pixel_values=torch_pixels).logits_per_image.numpy()
    every_output = lambda m, x, ids, mask: (m.vision_model(x).last_hidden_state, m.get_image_features(x),
                                            m.get_text_features(ids, mask), m(x, ids))
    ours = jax.jit(partial(model.apply, method=every_output))({"params": params}, pixels, ids, mask)
    for a, b in zip(ours, (want_hidden, want_image, want_text, want_logits), strict=True):
        assert rel_err(a, b) <= 1e-5


def test_score_matches_torchmetrics(clip_dirs):
    batch, results = images(), []
    for path in clip_dirs.values():
        metric = CLIPScore(model_name_or_path=lambda path=path: (TensorFeaturesCLIP.from_pretrained(path),
                                                                 transformers.CLIPProcessor.from_pretrained(path)))
        metric.update(torch.as_tensor(batch.transpose(0, 3, 1, 2)), CAPTIONS)
        scores, score = CLIPScorer.from_directory(path)(batch, CAPTIONS)
        assert abs(score - float(metric.compute())) <= 1e-4
        results.append((scores, score))
    (scores, score), (negated_scores, negated_score) = results
    # torchmetrics clips the mean, not the pairs (with pairs of both signs, clipping those would differ); flipping
    # every cosine flips the pairs' scores, and one of the two means is clipped.
    assert (scores > 0).any() and (scores < 0).any()
    np.testing.assert_allclose(negated_scores, -scores, rtol=0, atol=1e-4)
    assert min(score, negated_score) == 0.0 and max(score, negated_score) > 1.0


def test_pair_scores_match_transformers(reference, clip_dirs):
    batch = images()
    processor = transformers.CLIPProcessor.from_pretrained(clip_dirs["model"])
    inputs = processor(text=CAPTIONS, images=list(batch), return_tensors="pt", padding=True)
    with torch.no_grad():
        image = reference.get_image_features(inputs["pixel_values"]).pooler_output
        text = reference.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output
    want = 100 * torch.nn.functional.cosine_similarity(image, text).numpy()
    scorer = CLIPScorer.from_directory(clip_dirs["model"])
    scores, score = clip_score(scorer.model, scorer.params, batch, scorer.tokenizer(CAPTIONS))
    np.testing.assert_allclose(scores, want, rtol=0, atol=1e-4)
    assert score == max(float(np.mean(scores)), 0.0)


@pytest.mark.parametrize("shape, size", [
    pytest.param((2, 40, 48, 3), 32, id="landscape"), pytest.param((2, 48, 40, 3), 32, id="portrait"),
    pytest.param((2, 300, 451, 3), 224, id="downsample_224"), pytest.param((2, 150, 100, 3), 224, id="upsample_224"),
    pytest.param((2, 224, 224, 3), 224, id="model_size"),
])
def test_preprocess_matches_transformers(shape, size):
    batch = images(shape)
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size,
                                                                                           "width": size})
    want = processor(images=list(batch), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = preprocess(batch, size)
    np.testing.assert_array_equal(ours, want)
    np.testing.assert_array_equal(preprocess((batch / 255).astype(np.float32), size), ours)


def test_parameter_count_of_vit_l_14():
    with torch.device("meta"):
        reference = transformers.CLIPModel(transformers.CLIPConfig(**copy.deepcopy(VIT_L_14)))
    expected = sum(p.numel() for p in reference.parameters())
    ours = sum(x.size for x in jax.tree_util.tree_leaves(param_shapes(model_from_config(VIT_L_14))))
    assert ours == expected == 427_616_513


def test_config_as_transformers_reads_it():
    """openai's legacy config: transformers applies the *_config_dict entries and the defaults they leave out."""
    model = model_from_config(VIT_L_14)
    config = transformers.CLIPConfig(**copy.deepcopy(VIT_L_14))
    read = model_to_config(model)
    for tower in ("text_config", "vision_config"):
        assert read[tower] == {k: getattr(getattr(config, tower), k) for k in read[tower]}
    assert (model.projection_dim, model.logit_scale_init_value) == (768, 2.6592)
    assert model_from_config(json.loads(json.dumps(read))) == model
    assert build_model(json.loads(json.dumps(model_fields(model)))) == model


def test_saved_directory_loads_in_transformers(reference, clip_dirs, tmp_path):
    model, params = load_diffusers_model(clip_dirs["model"])
    save_diffusers_model(model, params, tmp_path)
    reloaded, info = transformers.CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    expected = reference.state_dict()
    assert reloaded.state_dict().keys() == expected.keys()
    for key, value in reloaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), expected[key].numpy())


@pytest.mark.parametrize("change, match", [
    (dict(foo=1), "'foo'"),
    (dict(text_config=dict(VIT_L_14["text_config"], foo=1)), "'foo'"),
    (dict(vision_config=dict(VIT_L_14["vision_config"], foo=1)), "'foo'"),
    (dict(vision_config_dict=dict(VIT_L_14["vision_config_dict"], hidden_act="relu")), "hidden_act='relu'"),
    (dict(vision_config=dict(VIT_L_14["vision_config"], pruned_heads={"0": [1]})), "'pruned_heads'"),
    (dict(architectures=["CLIPSegForImageSegmentation"]), "CLIPSegForImageSegmentation"),
])
def test_unsupported_config(change, match):
    with pytest.raises(ValueError, match=match):
        model_from_config(dict(VIT_L_14, **change))


def test_bad_images(clip_dirs):
    scorer = CLIPScorer.from_directory(clip_dirs["model"])
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\), got shape \(40, 48, 3\)"):
        scorer(images()[0], CAPTIONS[:1])
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\), got shape \(4, 40, 48, 1\)"):
        scorer(images()[..., :1], CAPTIONS)
    with pytest.raises(ValueError, match="uint8 images or float"):
        scorer(images().astype(np.int32), CAPTIONS)
    with pytest.raises(ValueError, match="for 4 images"):
        scorer(images(), CAPTIONS[:3])
    with pytest.raises(ValueError, match=r"shape \(batch, 32, 32, 3\) \(NHWC\), got \(1, 3, 32, 32\)"):
        scorer.model.apply({"params": scorer.params}, np.zeros((1, 3, 32, 32)), method="get_image_features")
