"""Where the reasoning ends and the answer begins: one rule, for whole texts and for streams.

The rule, used by chat, the server, eval, the data engine and the teacher alike:

1. Text from the first stop token (`<|im_end|>`, `<|endoftext|>`) on is dropped.
2. The mode is decided at the start. After a "think" prompt (which opened `<think>` itself) the
   text starts inside the reasoning; after a "nothink" prompt it is all answer. In "auto", the
   first non-space text decides: `<think>` opens the reasoning; a nothink marker (`<|dummy_84|>`,
   or the paper's spelling `<nothink>`) or anything else means a direct answer. A nothink marker
   there is removed (in "nothink" too, where the prompt has one already).
3. The reasoning ends at the FIRST `</think>`; everything after it is the answer, whatever it
   holds (another `</think>` included). A streaming caller must decide there, token by token, and
   `generation.core.SequenceState` does (it counts thinking tokens by the same rule); the
   server's `reasoning_content` and vLLM-style reasoning parsers split there too.
4. `<think>` repeated at the start of the reasoning is dropped. A `</think>` in a direct answer,
   or a marker in the middle of an answer, is answer text.
5. Reasoning that never closes leaves the answer empty and the completion unfinished, as does a
   stop by length. Thinking and answer are stripped of surrounding whitespace.

`parse_completion` applies the rule to a whole text; `CompletionSplitter` to text as it streams,
holding back only what might still turn out to be a marker; both give the same split (the
streamed pieces, joined and stripped) for any way of cutting the text into pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

THINK_START = "<think>"
THINK_END = "</think>"
NOTHINK_TOKEN = "<|dummy_84|>"  # the paper's <nothink>
NOTHINK_MARKERS = (NOTHINK_TOKEN, "<nothink>")  # the token, and the paper's spelling of it in text
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")

MODES = ("auto", "think", "nothink")
Mode = Literal["auto", "think", "nothink"]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


@dataclass
class Completion:
    thinking: str | None  # None for a direct answer
    answer: str
    mode: Literal["think", "nothink"]  # how the model answered
    finished: bool  # False: the reasoning never closed, or the text was cut by length


def _cut_at_stop(text: str) -> str:
    for stop in STOP_TOKENS:
        text = text.split(stop, 1)[0]
    return text


def parse_completion(text: str, mode: Mode, stopped_by_length: bool = False) -> Completion:
    """Split generated text into (thinking, answer) by the module's rule; `mode` is the prompt's."""
    _check_mode(mode)
    body = _cut_at_stop(text)
    if mode != "think":
        body = body.lstrip()
        if mode == "auto" and body.startswith(THINK_START):
            mode, body = "think", body[len(THINK_START) :]
        else:
            marker = next((m for m in NOTHINK_MARKERS if body.startswith(m)), "")
            return Completion(None, body[len(marker) :].strip(), "nothink", not stopped_by_length)
    while body.lstrip().startswith(THINK_START):
        body = body.lstrip()[len(THINK_START) :]
    thinking, closed, answer = body.partition(THINK_END)
    return Completion(thinking.strip(), answer.strip(), "think", bool(closed) and not stopped_by_length)


@dataclass
class Delta:
    kind: str  # "thinking" | "answer"
    text: str


def _partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start (not the whole) of one of `markers`."""
    return max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)


class CompletionSplitter:
    """`parse_completion`'s rule for streamed text: `push` pieces, get thinking / answer deltas
    with the markers removed. Text that might still become a marker is held back until it is
    decided (`final=True` on the last piece lets it all out)."""

    def __init__(self, mode: Mode):
        _check_mode(mode)
        # start: the mode is not decided yet; open: in the reasoning, nothing but space so far
        self.state = "open" if mode == "think" else "start"
        self.auto = mode == "auto"
        self.mode: str | None = "think" if mode == "think" else None  # how the model answers, once known
        self.closed = False  # the reasoning's </think> has been seen
        self.stopped = False  # a stop token was seen: nothing after it counts
        self.buf = ""

    @property
    def thinking(self) -> bool:
        """The text now arriving belongs to the reasoning."""
        return self.state in ("open", "reasoning")

    def push(self, text: str, final: bool = False) -> list[Delta]:
        if not self.stopped:
            self.buf += text
            cut = min((i for s in STOP_TOKENS if (i := self.buf.find(s)) >= 0), default=-1)
            if cut >= 0:
                self.buf, self.stopped = self.buf[:cut], True
        final = final or self.stopped
        out: list[Delta] = []
        while self._step(out, final):
            pass
        return out

    def _step(self, out: list[Delta], final: bool) -> bool:
        """Consume what can be decided; True when the state changed and there may be more."""
        rest = self.buf.lstrip()
        if self.state == "start":
            markers = ((THINK_START,) if self.auto else ()) + NOTHINK_MARKERS
            hit = next((m for m in markers if rest.startswith(m)), None)
            if hit is None and not final and (not rest or any(m.startswith(rest) for m in markers)):
                return False  # only space, or a marker's beginning: wait
            if hit is not None:
                self.buf = rest[len(hit) :]
            self.state = "open" if hit == THINK_START else "answer"
            self.mode = "think" if hit == THINK_START else "nothink"
            return True
        if self.state == "open":
            if rest.startswith(THINK_START):  # a repeated <think>
                self.buf = rest[len(THINK_START) :]
                return True
            if not final and (not rest or THINK_START.startswith(rest)):
                return False
            self.state = "reasoning"
            return True
        if self.state == "reasoning":
            i = self.buf.find(THINK_END)
            if i >= 0:
                self._emit(out, "thinking", self.buf[:i])
                self.buf = self.buf[i + len(THINK_END) :]
                self.state, self.closed = "answer", True
                return True
            keep = 0 if final else _partial_suffix(self.buf, (THINK_END, *STOP_TOKENS))
        else:  # answer
            keep = 0 if final else _partial_suffix(self.buf, STOP_TOKENS)
        self._emit(out, "thinking" if self.state == "reasoning" else "answer", self.buf[: len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep :]
        return False

    @staticmethod
    def _emit(out: list[Delta], kind: str, text: str) -> None:
        if text:
            out.append(Delta(kind, text))
