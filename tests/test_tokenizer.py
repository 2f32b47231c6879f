"""CLIPTokenizer against transformers' CLIPTokenizer on CLIP's real vocabulary.

The ids must be identical, as diffusers' StableDiffusionPipeline computes them:
``tokenizer(prompts, padding="max_length", max_length=77, truncation=True)``.
"""

import json
import shutil

import numpy as np
import pytest
import transformers

from deme_jax.text2image.tokenizer import CLIPTokenizer
from tests.clip_vocab import BOS, EOS, write_clip_tokenizer

PROMPTS = [
    "a photo of a cat",
    "",
    "An astronaut riding a horse on Mars, trending on artstation, 4k, highly detailed.",
    "Café crème brûlée, naïve façade, Ångström, ﬁne ligature",
    "東京の夜景 🌃 with emoji 👩‍👩‍👧 and 한국어",
    "  lots\tof\n\nwhite   space \r\n ",
    "don't, it's, we're, I'll, they've, she'd, I'm; DON'T",
    "digits 1234567, 3.14, 2nd, 1920x1080",
    "MiXeD CaSe WoRdS",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot;",
    "wow!! a cat! (best quality:1.2), [masterpiece] {x} #hashtag @user",
    "<|startoftext|>literal<|endoftext|> <|ENDOFTEXT|>",
    " ".join(f"word{i}" for i in range(100)),  # truncated at 77
    "x" * 500,
]


def pad_name(pad_token):
    return "sd2_pad_bang" if pad_token == "!" else "sd1_pad_endoftext"


@pytest.fixture(scope="module", params=[EOS, "!"], ids=pad_name)
def vocab_dir(request, tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp(pad_name(request.param)), pad_token=request.param)


def reference_ids(directory) -> np.ndarray:
    reference = transformers.CLIPTokenizer.from_pretrained(directory)
    assert reference.model_max_length == 77
    return np.array(reference(PROMPTS, padding="max_length", max_length=reference.model_max_length,
                              truncation=True).input_ids)


def assert_same_ids(directory):
    ours = CLIPTokenizer.from_directory(directory)(PROMPTS)
    assert ours.dtype == np.int32 and ours.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ours, reference_ids(directory))


def test_matches_transformers(vocab_dir):
    """The files of the Stable Diffusion releases (special tokens in special_tokens_map.json)."""
    assert_same_ids(vocab_dir)


def test_added_tokens_decoder_wins_over_special_tokens_map(vocab_dir, tmp_path):
    """transformers >= 4.34 lists the special tokens' flags in tokenizer_config.json and then ignores
    special_tokens_map.json; here they disagree on whether <|endoftext|> matches after lowercasing, and on
    the pad token."""
    directory = shutil.copytree(vocab_dir, tmp_path / "tokenizer")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    flags = dict(lstrip=False, rstrip=False, single_word=False, special=True)
    config["added_tokens_decoder"] = {"49406": dict(content=BOS, normalized=True, **flags),
                                      "49407": dict(content=EOS, normalized=False, **flags)}
    config.update({k: v if isinstance(v, str) else v["content"] for k, v in config.items() if k.endswith("_token")})
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!" if config["pad_token"] == EOS
                                                                   else EOS}))
    assert_same_ids(directory)


def test_save_and_transformers_save_layouts(vocab_dir, tmp_path):
    """transformers 5 saves tokenizer.json alone; ours saves it with vocab.json and merges.txt."""
    transformers.CLIPTokenizer.from_pretrained(vocab_dir).save_pretrained(tmp_path / "transformers")
    assert not (tmp_path / "transformers" / "vocab.json").exists()
    assert_same_ids(tmp_path / "transformers")
    saved = CLIPTokenizer.from_directory(vocab_dir).save(tmp_path / "ours")
    assert_same_ids(saved)
    (saved / "tokenizer.json").unlink()
    assert_same_ids(saved)


def test_real_vocabulary_and_layout(vocab_dir):
    pad = 0 if "bang" in vocab_dir.name else 49407
    ids = CLIPTokenizer.from_directory(vocab_dir)(["a photo of a cat", " ".join(["cat"] * 100)])
    np.testing.assert_array_equal(ids[0, :8], [49406, 320, 1125, 539, 320, 2368, 49407, pad])
    assert (ids[0, 7:] == pad).all()
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and (ids[1, 1:-1] == 2368).all()


def test_bad_input(vocab_dir, tmp_path):
    tokenizer = CLIPTokenizer.from_directory(vocab_dir)
    for prompts in ([], "a single string"):
        with pytest.raises(ValueError, match="non-empty list of prompts"):
            tokenizer(prompts)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_directory(tmp_path)
