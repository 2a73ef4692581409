"""The one thinking/answer rule: the whole-text splitter, its streaming twin, and the generation
core's thinking state all draw the line at the same place."""

import json
import random
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phi4rv.generation.core import GenerationParams, Markers, SequenceState
from phi4rv.processing.reasoning import (
    THINK_END,
    THINK_START,
    Completion,
    CompletionSplitter,
    parse_completion,
)
from phi4rv.processing.tokenizer import Tokenizer

CASES = [
    # (text, prompt mode, expected split)
    ("<think> step 1\nstep 2 </think>\n\n The answer is 4.<|im_end|>", "auto",
     Completion("step 1\nstep 2", "The answer is 4.", "think", True)),
    ("<think> still going, no end", "auto", Completion("still going, no end", "", "think", False)),
    ("<|dummy_84|> Paris.<|im_end|>", "auto", Completion(None, "Paris.", "nothink", True)),
    ("<|dummy_84|>(B)<|im_end|>junk", "auto", Completion(None, "(B)", "nothink", True)),
    ("<nothink> 42", "auto", Completion(None, "42", "nothink", True)),  # the paper's spelling
    ("  Paris.  \n", "auto", Completion(None, "Paris.", "nothink", True)),
    ("\n <think>\nreason\n</think>answer<|endoftext|>junk", "auto", Completion("reason", "answer", "think", True)),
    (" reasoning here </think> 42", "think", Completion("reasoning here", "42", "think", True)),
    ("reasoning cut off", "think", Completion("reasoning cut off", "", "think", False)),
    ("Paris.", "nothink", Completion(None, "Paris.", "nothink", True)),
    ("<|dummy_84|>Paris.", "nothink", Completion(None, "Paris.", "nothink", True)),
    ("<think></think>", "auto", Completion("", "", "think", True)),
    ("", "think", Completion("", "", "think", False)),
    ("   ", "auto", Completion(None, "", "nothink", True)),
    # several </think>: the first ends the reasoning, the rest is answer text
    ("<think>maybe (A)</think>wait</think> The answer is (C)", "auto",
     Completion("maybe (A)", "wait</think> The answer is (C)", "think", True)),
    ("a</think>b</think>c", "think", Completion("a", "b</think>c", "think", True)),
    # a repeated <think> at the start of the reasoning is dropped
    ("<think>\n<think>a</think>b", "auto", Completion("a", "b", "think", True)),
    (" <think> a </think> b", "think", Completion("a", "b", "think", True)),
    # the mode is decided at the start: a </think> in a direct answer is answer text
    ("abc</think>def", "auto", Completion(None, "abc</think>def", "nothink", True)),
    ("<|dummy_84|><think>x</think>y", "auto", Completion(None, "<think>x</think>y", "nothink", True)),
    ("<think>a</think>b", "nothink", Completion(None, "<think>a</think>b", "nothink", True)),
    ("The answer<|dummy_84|> is 4", "auto", Completion(None, "The answer<|dummy_84|> is 4", "nothink", True)),
    ("<think", "auto", Completion(None, "<think", "nothink", True)),
    # a stop token ends the text, inside the reasoning too
    ("<think>ab<|im_end|></think>c", "auto", Completion("ab", "", "think", False)),
    ("<think>a</think><|im_end|>", "auto", Completion("a", "", "think", True)),
]


@pytest.mark.parametrize("text, mode, expected", CASES)
def test_parse_completion(text, mode, expected):
    assert parse_completion(text, mode) == expected


def test_stopped_by_length_is_unfinished():
    assert parse_completion("<think> a </think> b", "auto", stopped_by_length=True) == Completion("a", "b", "think", False)
    assert not parse_completion("partial answ", "nothink", stopped_by_length=True).finished


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="mode must be one of"):
        parse_completion("x", "fast")
    with pytest.raises(ValueError, match="mode must be one of"):
        CompletionSplitter("fast")


def stream(text: str, mode: str, cuts: list[int]) -> tuple[CompletionSplitter, str | None, str]:
    """Feed `text` cut at `cuts`; the joined, stripped thinking (None if there was none) and answer."""
    sp = CompletionSplitter(mode)
    bounds = [0, *sorted(set(cuts)), len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    deltas = []
    for i, piece in enumerate(pieces):
        deltas += sp.push(piece, final=i == len(pieces) - 1)
    thinking = "".join(d.text for d in deltas if d.kind == "thinking")
    answer = "".join(d.text for d in deltas if d.kind == "answer")
    return sp, thinking.strip() if sp.mode == "think" else (thinking or None), answer.strip()


def assert_same_split(text: str, mode: str, cuts: list[int]) -> None:
    whole = parse_completion(text, mode)
    sp, thinking, answer = stream(text, mode, cuts)
    assert (thinking, answer, sp.mode) == (whole.thinking, whole.answer, whole.mode), (text, cuts)
    assert whole.finished == (sp.mode == "nothink" or sp.closed), (text, cuts)


@pytest.mark.parametrize("text, mode, expected", CASES)
def test_streaming_twin_gives_the_same_split_for_any_chunking(text, mode, expected):
    for size in (1, 2, 3, 5, 7, len(text) or 1):
        assert_same_split(text, mode, list(range(size, len(text), size)))
    rng = random.Random(0)
    for _ in range(20):
        assert_same_split(text, mode, rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))
                          if len(text) > 1 else [])


PIECES = ["<think>", "</think>", "<|dummy_84|>", "<nothink>", "<|im_end|>", "<|endoftext|>", " ", "\n", "a", "7",
          "<", "</", "<|", "think>", "|>", "x y"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12), st.sampled_from(["auto", "think", "nothink"]),
       st.lists(st.integers(0, 200), max_size=8))
def test_streaming_twin_agrees_on_marker_soup(pieces, mode, cuts):
    text = "".join(pieces)
    assert_same_split(text, mode, [c for c in cuts if 0 < c < len(text)])


def test_the_twin_holds_back_only_what_may_be_a_marker():
    sp = CompletionSplitter("auto")
    assert sp.push("<thi") == [] and not sp.thinking  # might still be <think>
    assert sp.push("nk>\n<th") == [] and sp.thinking  # may still be a repeated <think>
    assert [(d.kind, d.text) for d in sp.push("ought 4+5</th")] == [("thinking", "\n<thought 4+5")]
    assert [(d.kind, d.text) for d in sp.push("ink>4 and 5")] == [("answer", "4 and 5")]
    assert not sp.thinking and sp.closed


# ---- the generation core decides "thinking" token by token by the same rule -------------------


@pytest.fixture(scope="module", params=["single-token markers", "text markers"])
def tokenizer(request, tok_dir, tmp_path_factory):
    if request.param == "single-token markers":
        return Tokenizer.from_dir(tok_dir)
    path = tmp_path_factory.mktemp("text_markers")
    shutil.copytree(tok_dir, path, dirs_exist_ok=True)
    spec = json.loads((path / "tokenizer.json").read_text())
    for added in spec["added_tokens"]:
        if added["content"] in (THINK_START, THINK_END):
            added.update(content=f"<|dummy_{added['id'] - 100264}|>", special=True)
    (path / "tokenizer.json").write_text(json.dumps(spec))
    tok = Tokenizer.from_dir(path)
    assert len(tok.encode(THINK_START)) > 1
    return tok


# What generation can write in each mode: in nothink a reasoning block is banned at the start.
AGREEMENT = [
    ("auto", "<think>\nfirst 4, then 7\n</think>\n\n11 and </think> again <think> 12"),
    ("auto", "  <think>a</think>b"),
    ("auto", "<|dummy_84|>Paris <think>x</think> y"),
    ("auto", "Paris</think> and more"),
    ("auto", "<think>never closed"),
    ("think", "step one</think>\n\nanswer</think>tail"),
    ("think", "<think>again</think>ok"),
    ("nothink", "Paris </think> or <think> London"),
]


@pytest.mark.parametrize("mode, text", AGREEMENT)
def test_sequence_state_thinks_exactly_where_the_splitter_does(tokenizer, mode, text):
    state = SequenceState(tokenizer, GenerationParams(max_new_tokens=1000), mode, Markers(tokenizer))
    sp = CompletionSplitter(mode)
    thinking_tokens = 0
    for token in tokenizer.encode(text):
        before = len(state.text)
        thinking_tokens += sp.thinking
        state.push(token)
        sp.push(state.text[before:])
        assert state.thinking == sp.thinking, (state.text, sp.state)
    whole = parse_completion(text, mode)
    assert state.closed == sp.closed == (whole.mode == "think" and whole.finished)
    assert state.thinking_tokens == thinking_tokens
