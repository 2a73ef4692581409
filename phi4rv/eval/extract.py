"""Answer extraction: deterministic, and None whenever nothing can be read (never a guess).

Every scorer reads the answer part only (the reasoning is split off first, by
`processing.reasoning.parse_completion`), so a letter or number in the thinking never counts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from phi4rv.processing.answers import norm_text

# ---- final answer span ------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{…}` (nested braces allowed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


_ANSWER_IS = re.compile(r"(?i)\b(?:final\s+answer|answer)\s*(?:is|:|：|=)\s*:?\s*")


def final_span(text: str) -> str:
    """The part of an answer that states the result: the last `\\boxed{…}`, else what follows the
    last "answer is" / "Answer:" up to the end of that line, else the whole text. Markdown bold
    markers, surrounding quotes and one trailing period are removed."""
    span = last_boxed(text)
    if span is None:
        hits = list(_ANSWER_IS.finditer(text))
        span = text[hits[-1].end() :].split("\n", 1)[0] if hits else text
    span = span.replace("**", "").strip().strip("\"'`").strip()
    if span.endswith(".") and not span.endswith(".."):
        span = span[:-1].rstrip()
    return span


# ---- multiple choice --------------------------------------------------------------------------

_EXPLICIT = re.compile(
    r"\\boxed\{\s*\(?(?P<a>[A-Z])\)?\s*\}"
    r"|(?i:\banswer\b(?:\s+is)?|\b(?:option|choice)\b(?:\s+is)?)\s*[:：=]?\s*(?i:option\s+|choice\s+)?"
    r"[(\[]?(?P<b>[A-Z])[)\]]?(?![A-Za-z0-9'’])"
)
_LEADING = re.compile(r"\s*(?:\((?P<a>[A-Z])\)|\[(?P<b>[A-Z])\]|(?P<c>[A-Z])(?![A-Za-z0-9'’]))")
_PAREN = re.compile(r"\(([A-Z])\)")
_BARE = re.compile(r"(?<![A-Za-z0-9'’])([A-Z])(?![A-Za-z0-9'’])")
_WORD_AFTER = re.compile(r"\s+[a-z]")


def _is_word(text: str, m: re.Match, letter: str) -> bool:
    """"A" / "I" followed by a lower-case word are the article / pronoun, not a choice."""
    return letter in ("A", "I") and _WORD_AFTER.match(text, m.end()) is not None


def extract_choice(text: str, letters: Sequence[str], options: Sequence[str] | None = None) -> str | None:
    """The chosen letter in an answer, or None.

    Rules in order (the first that finds a valid letter decides):
    1. an explicit statement — `\\boxed{B}`, "the answer is (B)", "Answer: B", "option B" — the last one;
    2. an answer-first reply that opens with the letter: "B", "(B) 12 cm", "B. Because …";
    3. the last `(B)` anywhere (answer-last replies);
    4. the last standalone capital letter among the choices ("A"/"I" before a lower-case word are
       words, not letters);
    5. the option text: equal to exactly one option, else exactly one option found as a phrase.
    """
    t = text.replace("**", "")
    valid = set(letters)
    explicit = [m.group("a") or m.group("b") for m in _EXPLICIT.finditer(t)]
    explicit = [x for x in explicit if x in valid]
    if explicit:
        return explicit[-1]
    m = _LEADING.match(t)
    if m:
        letter = m.group("a") or m.group("b") or m.group("c")
        if letter in valid and not (m.group("c") and _is_word(t, m, letter)):
            return letter
    paren = [x for x in _PAREN.findall(t) if x in valid]
    if paren:
        return paren[-1]
    bare = [m.group(1) for m in _BARE.finditer(t) if m.group(1) in valid and not _is_word(t, m, m.group(1))]
    if bare:
        return bare[-1]
    if options:
        return _choice_by_text(t, letters, options)
    return None


def _choice_by_text(text: str, letters: Sequence[str], options: Sequence[str]) -> str | None:
    a = norm_text(text)
    if not a:
        return None
    pairs = [(letter, norm_text(str(o))) for letter, o in zip(letters, options)]
    exact = [letter for letter, o in pairs if o == a]
    if len(exact) == 1:
        return exact[0]
    found = [(letter, o) for letter, o in pairs if o and re.search(r"(?<!\w)" + re.escape(o) + r"(?!\w)", a)]
    # an option found only as part of a longer option that is also found does not count
    found = [(letter, o) for letter, o in found if not any(o != o2 and o in o2 for _, o2 in found)]
    return found[0][0] if len(found) == 1 else None


def letters_for(n: int) -> list[str]:
    return [chr(65 + i) for i in range(n)]


# ---- boxes and points -------------------------------------------------------------------------

_C = r"\s*([-+]?\d+(?:\.\d+)?|[-+]?\.\d+)\s*"
_POINT_OR_BOX = re.compile(r"[\[(]" + _C + "," + _C + r"(?:," + _C + "," + _C + r")?[\])]")

COORDS = ("fraction", "thousand", "pixel")


def extract_click(text: str, width: int, height: int, coords: str = "fraction",
                  strict: bool = True) -> tuple[float, float] | None:
    """The click point, in pixels of the original `width` x `height` image, from the last
    `[x1, y1, x2, y2]` box (its centre) or `[x, y]` / `(x, y)` point in `text`.

    `coords` says what the numbers mean — never guessed: "fraction" (0–1 of width/height, the
    release's grounding contract), "thousand" (0–1000), "pixel" (the original image). `strict`:
    a value outside that range, or a box with x1 > x2 or y1 > y2, makes the answer unparsed;
    otherwise (the official ScreenSpot evaluation) any box gives its centre and a point off the
    image simply misses.
    """
    if coords not in COORDS:
        raise ValueError(f"coords must be one of {', '.join(COORDS)}, got {coords!r}")
    matches = list(_POINT_OR_BOX.finditer(text))
    if not matches:
        return None
    vals = [float(v) for v in matches[-1].groups() if v is not None]
    limit_x, limit_y = {"fraction": (1.0, 1.0), "thousand": (1000.0, 1000.0), "pixel": (width, height)}[coords]
    xs, ys = vals[0::2], vals[1::2]
    if strict and (not all(0 <= x <= limit_x for x in xs) or not all(0 <= y <= limit_y for y in ys)):
        return None
    if len(vals) == 4:
        if strict and (xs[0] > xs[1] or ys[0] > ys[1]):
            return None
        x, y = sum(xs) / 2, sum(ys) / 2
    else:
        x, y = xs[0], ys[0]
    return x / limit_x * width, y / limit_y * height
