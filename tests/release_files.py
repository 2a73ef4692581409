"""The release's config and tokenizer files as test fixtures, and a strict field-by-field check.

config.json, generation_config.json and preprocessor_config.json are the release's own files
(copies of ../shared/reference/ in fixtures/). The release's tokenizer_config.json was not
available to us; RELEASE_TOKENIZER_CONFIG below is written down from public sources:
- `tokenizer_class` "GPT2Tokenizer": the Phi-4 family's tokenizer_config (microsoft/phi-4 on the
  Hugging Face Hub; llama.cpp's converter, conversion/phi.py `Phi3MiniModel.set_vocab`, branches
  on exactly this value "for Phi-4"), and the release's, as issue 21 reports it.
- bos/eos/pad names: microsoft/phi-4 special_tokens_map.json at commit 6fbb3d3 ("Suggested
  tokenizer changes by Unsloth.ai (#21)"): bos "<|endoftext|>", eos "<|im_end|>", pad
  "<|dummy_85|>", which are the release's config.json ids 100257 / 100265 / 100349.
- `model_max_length`: the release's config.json `tokenizer_model_max_length` (8192).
- the ids 100256..100351 and their names: Phi-4's layout (torchtune's PHI4_SPECIAL_TOKENS,
  microsoft/phi-4 added_tokens.json), special, none normalized or stripped; except that
  Phi-4-reasoning turned two placeholders into `<think>` / `</think>` (single tokens: the release's
  sample.ipynb appends "<think>" to a think-mode prompt and steps back exactly one token to keep it
  in the decoded output, which `skip_special_tokens=True` would drop were it special). The slots,
  100280 / 100281 (`<|dummy_16|>` / `<|dummy_17|>` in Phi-4), are written from memory of
  Phi-4-reasoning's tokenizer files and could not be checked offline.
- add_bos_token / add_eos_token / add_prefix_space / clean_up_tokenization_spaces / errors /
  unk_token: the values Phi-4's GPT2Tokenizer files carry (no BOS added; GPT-2's byte-level
  defaults), not verified against the release's own file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"
FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer_config.json")

# Phi-4's named special tokens; every other id in 100256..100351 is `<|dummy_N|>`, N counting up
# (the two reasoning markers take their placeholders' slots and numbers).
_NAMED = {
    100257: "<|endoftext|>",
    100258: "<|fim_prefix|>",
    100259: "<|fim_middle|>",
    100260: "<|fim_suffix|>",
    100264: "<|im_start|>",
    100265: "<|im_end|>",
    100266: "<|im_sep|>",
    100276: "<|endofprompt|>",
}
_REASONING = {100280: "<think>", 100281: "</think>"}


def _added_tokens_decoder() -> dict[str, dict]:
    out, dummy = {}, 0
    for i in range(100256, 100352):
        if i in _NAMED:
            name = _NAMED[i]
        else:
            name, dummy = _REASONING.get(i, f"<|dummy_{dummy}|>"), dummy + 1
        out[str(i)] = {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": i not in _REASONING}
    return out


RELEASE_TOKENIZER_CONFIG: dict[str, Any] = {
    "add_bos_token": False,
    "add_eos_token": False,
    "add_prefix_space": False,
    "added_tokens_decoder": _added_tokens_decoder(),
    "bos_token": "<|endoftext|>",
    "clean_up_tokenization_spaces": False,
    "eos_token": "<|im_end|>",
    "errors": "replace",
    "model_max_length": 8192,
    "pad_token": "<|dummy_85|>",
    "tokenizer_class": "GPT2Tokenizer",
    "unk_token": "<|endoftext|>",
}


def release_file(name: str) -> dict:
    if name == "tokenizer_config.json":
        return RELEASE_TOKENIZER_CONFIG
    return json.loads((FIXTURES / name).read_text())


def differences(ours: Any, ref: Any, path: str = "", values: bool = True) -> list[str]:
    """Every missing or extra key, differing type (1 vs 1.0 vs True count as different) and, with
    `values`, differing value, as 'path: what' lines."""
    if type(ours) is not type(ref):
        return [f"{path or '.'}: {type(ours).__name__} {ours!r} where the release has {type(ref).__name__} {ref!r}"]
    if isinstance(ref, dict):
        out = [f"{path}.{k}: missing" for k in ref if k not in ours]
        out += [f"{path}.{k}: not in the release" for k in ours if k not in ref]
        for k in ref:
            if k in ours:
                out += differences(ours[k], ref[k], f"{path}.{k}", values)
        return out
    if isinstance(ref, list) and values:
        if len(ours) != len(ref):
            return [f"{path}: {ours!r} where the release has {ref!r}"]
        return [d for i, (a, b) in enumerate(zip(ours, ref)) for d in differences(a, b, f"{path}[{i}]", values)]
    if values and ours != ref:
        return [f"{path}: {ours!r} where the release has {ref!r}"]
    return []


def layout_differences(folder: Path) -> list[str]:
    """For a checkpoint of any shape: the release's keys and types in each file (values may be
    derived from the shape), and the few values every checkpoint must carry."""
    out = []
    for name in FILES:
        ours = json.loads((folder / name).read_text())
        ref = release_file(name)
        if name == "config.json":
            # a smaller vision tower may spell out fields the release leaves implied
            ours = {**ours, "vision_config": {k: v for k, v in ours["vision_config"].items() if k in ref["vision_config"]}}
        if name == "tokenizer_config.json":
            # the added tokens' ids depend on the vocabulary; each entry has the release's fields
            entries = list(ours.get("added_tokens_decoder", {}).values())
            out += [f"{name}: added token {e!r}" for e in entries
                    for d in differences(e, ref["added_tokens_decoder"]["100257"], values=False) if d]
            ours = {k: v for k, v in ours.items() if k != "added_tokens_decoder"}
            ref = {k: v for k, v in ref.items() if k != "added_tokens_decoder"}
            out += [f"{name}: {d}" for d in differences(ours, ref, values=False)]
            if ours.get("tokenizer_class") != "GPT2Tokenizer":
                out.append(f"{name}: tokenizer_class {ours.get('tokenizer_class')!r}")
            continue
        out += [f"{name}: {d}" for d in differences(ours, ref, values=False)]
    config = json.loads((folder / "config.json").read_text())
    if config.get("original_max_position_embeddings") != config["max_position_embeddings"]:
        out.append(f"config.json: original_max_position_embeddings {config.get('original_max_position_embeddings')!r}")
    return out
