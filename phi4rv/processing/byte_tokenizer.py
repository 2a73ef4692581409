"""A byte-level tokenizer in Phi-4's layout, for models small enough to train on a CPU.

256 byte tokens (or a byte-level BPE learned from a corpus) followed by Phi-4's 96 special tokens
under the same names, so the chat template, mode markers and assistant masks work as with
Phi-4's own 100352-word tokenizer while the model's vocabulary stays a few hundred words.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from phi4rv.processing.chat import DEFAULT_CHAT_TEMPLATE
from phi4rv.processing.tokenizer import (
    CONFIG_FILE,
    TEMPLATE_FILE,
    TOKENIZER_FILE,
    bytes_to_unicode,
    phi4_added_tokens,
    release_tokenizer_config,
)


def template_with_system(system: str) -> str:
    """Our chat template with its fixed system prompt replaced (tiny models: fewer tokens)."""
    out = re.sub(r'\{%- set system = ".*?" -%\}', lambda _: '{%- set system = "' + system + '" -%}',
                 DEFAULT_CHAT_TEMPLATE, count=1, flags=re.S)
    if system not in out:
        raise ValueError("the chat template has no `{%- set system = ... -%}` line to replace")
    return out


def build_byte_tokenizer(out_dir: str | Path, chat_template: str, corpus: Iterable[str] | None = None,
                         vocab_size: int = 512) -> Path:
    """Write tokenizer.json / tokenizer_config.json / chat_template.jinja: bytes + Phi-4 specials.

    With `corpus`, byte-level BPE merges are learned from it up to `vocab_size` (GPT-style splits,
    so small numbers and frequent words become single tokens, as in Phi-4's own tokenizer);
    the special tokens come after the learned vocabulary."""
    b2u = bytes_to_unicode()
    if corpus is None:
        tok = _HFTokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[], fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    else:
        tok = _HFTokenizer(models.BPE(fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(corpus, trainer)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(phi4_added_tokens())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / TOKENIZER_FILE))
    config = release_tokenizer_config(tok, model_max_length=4096)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (out / TEMPLATE_FILE).write_text(chat_template)
    return out
