"""CLIP's tokenizer for a diffusers ``tokenizer/`` directory, without transformers.

Builds the ``tokenizers`` pipeline transformers' ``CLIPTokenizer`` builds (byte-level
BPE with a ``</w>`` end-of-word suffix; NFC, whitespace collapse and lowercasing;
CLIP's split regex) and encodes prompts as diffusers' Stable Diffusion pipelines
do: ``<|startoftext|> ... <|endoftext|>``, truncated and padded to
``model_max_length``. The special tokens come from the directory's configs, which
matters: SD 2.x pads with ``!``, and as a special token every ``!`` in a prompt
then encodes to the pad id, as it does in transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

CONTEXT_LENGTH = 77  # CLIP's, for a tokenizer_config.json without model_max_length
SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "pad_token": "<|endoftext|>"}
SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def content(token: str | dict) -> str:
    return token if isinstance(token, str) else token["content"]


def added_token(token: str | dict) -> AddedToken:
    """A special token as transformers adds it: a plain string matches the raw text only (not normalized)."""
    if isinstance(token, str):
        return AddedToken(token, special=True, normalized=False)
    flags = {k: token[k] for k in ADDED_TOKEN_FLAGS if k in token}
    return AddedToken(token["content"], special=token.get("special", True), **flags)


def special_tokens(path: Path, config: dict) -> dict:
    """bos/eos/unk/pad as ``tokenizer_config.json`` gives them, overridden by ``special_tokens_map.json`` unless the
    config lists ``added_tokens_decoder`` (transformers >= 4.34 writes it), as transformers reads them."""
    tokens = {name: config.get(name, default) for name, default in SPECIAL_TOKENS.items()}
    if "added_tokens_decoder" not in config:
        tokens.update({k: v for k, v in read_json(path / "special_tokens_map.json").items() if k in tokens})
    return tokens


def bpe_tokenizer(path: Path, config: dict, tokens: dict) -> Tokenizer:
    """transformers' CLIP pipeline over ``vocab.json`` and ``merges.txt``."""
    missing = [name for name in ("vocab.json", "merges.txt") if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} has no {' or '.join(missing)}: a CLIP tokenizer directory (a diffusers "
                                "pipeline's tokenizer/) holds vocab.json and merges.txt, or tokenizer.json.")
    decoder = config.get("added_tokens_decoder", {})
    added = [decoder[i] for i in sorted(decoder, key=int)]
    listed = {content(token) for token in added}
    added += [token for token in tokens.values() if content(token) not in listed]

    model = BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"), continuing_subword_prefix="",
                          end_of_word_suffix="</w>", fuse_unk=False, unk_token=content(tokens["unk_token"]))
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    # One at a time, in transformers' order: a token named twice keeps the flags of its last mention.
    for token in added:
        tokenizer.add_special_tokens([added_token(token)])
    bos, eos = content(tokens["bos_token"]), content(tokens["eos_token"])
    tokenizer.post_processor = processors.RobertaProcessing(
        (eos, tokenizer.token_to_id(eos)), (bos, tokenizer.token_to_id(bos)), trim_offsets=False,
        add_prefix_space=False)
    return tokenizer


class CLIPTokenizer:
    """``tokenizer(prompts)`` -> int32 ids of shape (len(prompts), model_max_length).

    ``backend`` is the ``tokenizers.Tokenizer``; ``special_tokens`` names the bos, eos,
    unk and pad tokens.
    """

    def __init__(self, backend: Tokenizer, model_max_length: int, special_tokens: dict[str, str]):
        pad = special_tokens["pad_token"]
        backend.enable_truncation(model_max_length)
        backend.enable_padding(length=model_max_length, pad_id=backend.token_to_id(pad), pad_token=pad)
        self.backend = backend
        self.model_max_length = model_max_length
        self.special_tokens = special_tokens

    @classmethod
    def from_directory(cls, path: str | Path) -> CLIPTokenizer:
        """A ``tokenizer/`` directory: ``tokenizer.json`` where present, as transformers prefers it (transformers 5
        saves nothing else), else ``vocab.json`` and ``merges.txt``."""
        path = Path(path)
        config = read_json(path / "tokenizer_config.json")
        tokens = special_tokens(path, config)
        if (path / "tokenizer.json").is_file():
            backend = Tokenizer.from_file(str(path / "tokenizer.json"))
        else:
            backend = bpe_tokenizer(path, config, tokens)
        names = {name: content(token) for name, token in tokens.items()}
        return cls(backend, config.get("model_max_length", CONTEXT_LENGTH), names)

    def save(self, path: str | Path) -> Path:
        """Writes ``tokenizer.json`` (without padding and truncation, which transformers sets per call) and
        ``tokenizer_config.json``, as transformers 5 saves, plus ``vocab.json`` and ``merges.txt`` for readers
        that build the tokenizer from those (transformers 4's CLIPTokenizer)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        backend = Tokenizer.from_str(self.backend.to_str())
        backend.no_padding()
        backend.no_truncation()
        backend.save(str(path / "tokenizer.json"))
        backend.model.save(str(path))
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length, **self.special_tokens}
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return path

    def __call__(self, prompts: list[str]) -> np.ndarray:
        if isinstance(prompts, str) or not len(prompts):
            raise ValueError(f"Expected a non-empty list of prompts, got {prompts!r}.")
        return np.array([e.ids for e in self.backend.encode_batch(list(prompts))], dtype=np.int32)
