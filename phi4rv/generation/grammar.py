"""Grammar-constrained decoding of the answer: a regular language (from a JSON schema) compiled
against the tokenizer's vocabulary by outlines-core, which gives at each step the tokens that
keep the answer inside the language.

A `Grammar` is compiled once per (pattern, tokenizer) and shared; each sequence walks it with
its own `Constraint`. Only the answer is constrained: the reasoning inside `<think>` stays free.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from functools import lru_cache

import numpy as np

from phi4rv.processing.tokenizer import Tokenizer

# `{"type": "json_object"}`: any JSON object whose values are scalars, arrays of scalars, or
# objects of scalars (a deeper generic object compiles to a regex ~10x slower to index).
_SCALAR = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]}
JSON_OBJECT_SCHEMA = {
    "type": "object",
    "additionalProperties": {"anyOf": [_SCALAR, {"type": "array", "items": _SCALAR},
                                       {"type": "object", "additionalProperties": _SCALAR}]},
}


MASK_CACHE = 64  # grammar states whose banned-token masks a Grammar keeps (vocabulary-sized bools each)


class GrammarError(ValueError):
    pass


def schema_regex(schema: dict) -> str:
    """The regular expression outlines-core derives from a JSON schema (compact whitespace)."""
    from outlines_core.json_schema import build_regex_from_schema

    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    try:
        return build_regex_from_schema(json.dumps(schema), r"[ ]?")
    except Exception as e:  # outlines-core raises its own error types for unsupported schemas
        raise GrammarError(f"unsupported JSON schema: {e}") from None


class _Vocabulary:
    """outlines-core's view of a tokenizer: each non-special token's bytes -> ids."""

    _cache: dict[int, _Vocabulary] = {}

    def __init__(self, tokenizer: Tokenizer):
        from outlines_core import Vocabulary

        by_bytes: dict[bytes, list[int]] = {}
        for i in range(tokenizer.vocab_size):
            if not tokenizer.is_special(i):
                by_bytes.setdefault(tokenizer.token_bytes(i), []).append(i)
        if tokenizer.eos_id is None:
            raise GrammarError("constrained decoding needs the tokenizer's eos token")
        self.vocabulary = Vocabulary(tokenizer.eos_id, by_bytes)

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> _Vocabulary:
        key = id(tokenizer)
        if key not in cls._cache:
            cls._cache[key] = cls(tokenizer)
        return cls._cache[key]


@lru_cache(maxsize=64)
def _index(pattern: str, vocabulary: _Vocabulary):
    from outlines_core import Index

    try:
        return Index(pattern, vocabulary.vocabulary)
    except Exception as e:
        raise GrammarError(f"cannot compile the grammar: {e}") from None


@lru_cache(maxsize=64)
def _grammar(pattern: str, tokenizer: Tokenizer) -> Grammar:
    return Grammar(pattern, tokenizer)


class Grammar:
    """A compiled language over a tokenizer's tokens (shared, read-only)."""

    def __init__(self, pattern: str, tokenizer: Tokenizer):
        self.pattern = pattern
        self.eos = tokenizer.eos_id
        self.index = _index(pattern, _Vocabulary.of(tokenizer))
        self._transitions: dict[int, dict[int, int]] | None = None
        self._distance: dict[int, int] = {}
        self._closing: dict[int, np.ndarray | None] = {}
        self._banned: OrderedDict[int, np.ndarray] = OrderedDict()  # a few recent states' masks

    def banned_mask(self, guide, state: int, vocab_size: int) -> np.ndarray:
        """[vocab_size] bool: the tokens that would leave the language from `state` (read-only).
        Decoding keeps revisiting a few states (inside a string, between items), so the masks of
        the last `MASK_CACHE` states are kept."""
        mask = self._banned.get(state)
        if mask is None or mask.size != vocab_size:
            words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
            guide.write_mask_into(words.ctypes.data, words.size, 4)
            mask = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab_size].view(np.bool_)
            np.logical_not(mask, out=mask)
            mask.flags.writeable = False
            self._banned[state] = mask
            if len(self._banned) > MASK_CACHE:
                self._banned.popitem(last=False)
        else:
            self._banned.move_to_end(state)
        return mask

    def distance(self, state: int) -> int:
        """Fewest tokens from `state` to a complete text (a large number if none)."""
        if self._transitions is None:
            self._transitions = self.index.get_transitions()
            before: dict[int, set[int]] = {}
            for a, edges in self._transitions.items():
                for b in set(edges.values()):
                    before.setdefault(b, set()).add(a)
            frontier = list(self.index.get_final_states())
            self._distance = dict.fromkeys(frontier, 0)
            while frontier:  # breadth-first from the final states, backwards
                nxt = []
                for b in frontier:
                    for a in before.get(b, ()):
                        if a not in self._distance:
                            self._distance[a] = self._distance[b] + 1
                            nxt.append(a)
                frontier = nxt
        return self._distance.get(state, 1 << 30)

    def closing_mask(self, state: int, vocab_size: int) -> np.ndarray | None:
        """[vocab_size] bool: the tokens from `state` that do not bring the text one token closer
        to complete (None if none does)."""
        if state not in self._closing:
            d = self.distance(state)
            ids = [t for t, b in self._transitions.get(state, {}).items() if self.distance(b) < d]
            mask = None
            if ids:
                mask = np.ones(vocab_size, dtype=np.bool_)
                mask[ids] = False
                mask.flags.writeable = False
            self._closing[state] = mask
        return self._closing[state]

    @classmethod
    def from_schema(cls, schema: dict, tokenizer: Tokenizer) -> Grammar:
        return cls.compile(schema_regex(schema), tokenizer)

    @classmethod
    def compile(cls, pattern: str, tokenizer: Tokenizer) -> Grammar:
        """The shared Grammar of `pattern` (its distance table and masks are reused by every
        request that asks for the same language)."""
        return _grammar(pattern, tokenizer)

    def start(self) -> Constraint:
        return Constraint(self)


class Constraint:
    """One sequence's position in a `Grammar`."""

    def __init__(self, grammar: Grammar):
        from outlines_core import Guide

        self.grammar = grammar
        self.guide = Guide(grammar.index)

    def banned(self, vocab_size: int, budget: int | None = None) -> np.ndarray:
        """[vocab_size] bool, read-only: the tokens that would leave the language (eos is allowed
        once the text is complete). With `budget` tokens left (the closing eos included), once the
        text needs all of them to complete, only tokens that bring it closer are allowed: the
        answer always completes when it can."""
        state = self.guide.get_state()
        if budget is not None and not self.guide.is_finished() and budget - 1 <= self.grammar.distance(state) + 1:
            closing = self.grammar.closing_mask(state, vocab_size)
            if closing is not None:
                return closing
        return self.grammar.banned_mask(self.guide, state, vocab_size)

    def advance(self, token: int) -> None:
        if token != self.grammar.eos:  # eos ends the text; the language has no transition for it
            self.guide.advance(token, return_tokens=False)  # the list of allowed tokens is not needed

    @property
    def finished(self) -> bool:
        return self.guide.is_finished()
