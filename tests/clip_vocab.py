"""Writes CLIP's real tokenizer files (vocab.json, merges.txt, configs) from open_clip's BPE data.

OpenAI's CLIP vocabulary is derived from ``bpe_simple_vocab_16e6.txt.gz``, which
open_clip ships: the 256 byte symbols, their ``</w>`` forms, the first 48,894
merges' joined tokens, then ``<|startoftext|>`` (49406) and ``<|endoftext|>``
(49407), as ``open_clip.tokenizer.SimpleTokenizer`` builds it. Only the data file
is read, so open_clip's own imports (torchvision, ftfy) need not resolve.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bpe_data() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise AssertionError("open_clip is not installed; the CLIP vocabulary comes from its data file. Install it "
                             "with `pip install --no-deps open_clip_torch`.")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + n) for n in range(len(others))]


def write_clip_tokenizer(directory: Path, pad_token: str = EOS) -> Path:
    """A diffusers ``tokenizer/`` directory: SD 1.x pads with ``<|endoftext|>``, SD 2.x with ``!``."""
    lines = gzip.decompress(bpe_data().read_bytes()).decode("utf-8").split("\n")[1:NUM_MERGES + 1]
    base = bytes_to_unicode()
    tokens = base + [b + "</w>" for b in base] + ["".join(line.split()) for line in lines] + [BOS, EOS]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    special = lambda t: {"content": t, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    tokens_map = {"bos_token": special(BOS), "eos_token": special(EOS), "unk_token": special(EOS),
                  "pad_token": pad_token}
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
              "tokenizer_class": "CLIPTokenizer", "special_tokens_map_file": "./special_tokens_map.json",
              **{k: {"__type": "AddedToken", **v} if isinstance(v, dict) else v for k, v in tokens_map.items()}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(tokens_map, indent=2))
    return directory
