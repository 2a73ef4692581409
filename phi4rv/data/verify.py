"""Answer checking shared by curation, teacher synthesis and evaluation on synthetic data.

`verify(prediction, answer, answer_type)` says whether a model's output matches a ground-truth
answer: numbers within a tolerance, texts after normalisation, choice letters, boxes by IoU,
orders element by element. The `<think>` part of a prediction is dropped first. `check_sample`
reads the answer, its type, the choices and any per-sample tolerance from a sample's `meta`.

`check_format` and `repair_format` judge a dataset's own answers (curation): whether an answer has
the form its type needs, and a safe rewrite when it only has the wrong form.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from phi4rv.processing.answers import normalize_text, parse_number
from phi4rv.processing.chat import parse_box
from phi4rv.processing.reasoning import NOTHINK_TOKEN, THINK_END, THINK_START, parse_completion

ANSWER_TYPES = ("number", "text", "choice", "box", "order")


@dataclass(frozen=True)
class Tolerance:
    rel: float = 0.0  # relative tolerance on numbers (ChartQA's relaxed accuracy uses 0.05)
    abs: float = 1e-6  # absolute tolerance on numbers
    iou: float = 0.5  # least IoU for a box to count


# ---- extraction ------------------------------------------------------------------------------

_PREFIX = re.compile(r"^\s*(?:(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*|answer\s*:\s*)", re.I)


def final_answer(text: str) -> str:
    """The answer part of a model output (split by `parse_completion`'s rule: an unclosed `<think>`
    leaves nothing), without an "Answer:" prefix."""
    c = parse_completion(text, "auto")
    return _PREFIX.sub("", c.answer).strip() if c.finished else ""


_CHOICE_ALONE = re.compile(r"^\(?([A-Za-z])\)?[.):]?$")
_CHOICE_LEAD = re.compile(r"^(?:\(([A-Za-z])\)|([A-Z])[.):])\s")
_CHOICE_END = re.compile(r"(?:^|\s)\(?([A-Z])\)?\.?$")
_CHOICE_SAID = re.compile(r"(?i:option|choice|answer(?: is)?)\s*:?\s*\(?([A-Z])\)?(?![\w])")


def parse_choice(text: str, choices: list[str] | None = None) -> str | None:
    """The option letter an answer picks: "B", "(B)", "B. text", "option B", or an option's text."""
    t = text.strip()
    if choices:
        norm = normalize_text(t)
        for i, c in enumerate(choices):
            if normalize_text(c) == norm:
                return chr(ord("A") + i)
    for pattern in (_CHOICE_ALONE, _CHOICE_LEAD):
        m = pattern.match(t)
        if m:
            return next(g for g in m.groups() if g).upper()
    m = _CHOICE_SAID.search(t) or _CHOICE_END.search(t)
    return m.group(1) if m else None


def parse_order(text: str) -> list[str] | None:
    """An order such as "2, 3, 1" or "B, A, C" as a list of its items."""
    items = re.findall(r"\b(\d+|[A-Za-z])\b", text)
    return [i.upper() for i in items] or None


def iou(a: tuple[float, ...] | list[float], b: tuple[float, ...] | list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ---- verification ----------------------------------------------------------------------------


def verify(prediction: str, answer: str, answer_type: str, tol: Tolerance = Tolerance(),
           choices: list[str] | None = None) -> bool:
    """Whether `prediction` (a full model output) states the ground-truth `answer`."""
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer type {answer_type!r} (one of {', '.join(ANSWER_TYPES)})")
    pred = final_answer(prediction)
    gold = final_answer(answer)
    if not pred:
        return False
    if answer_type == "number":
        p, g = parse_number(pred), parse_number(gold)
        if p is None or g is None:
            return False
        return math.isclose(p, g, rel_tol=tol.rel, abs_tol=tol.abs)
    if answer_type == "choice":
        p, g = parse_choice(pred, choices), parse_choice(gold, choices)
        return p is not None and p == g
    if answer_type == "box":
        p, g = parse_box(pred), parse_box(gold)
        return p is not None and g is not None and iou(p, g) >= tol.iou
    if answer_type == "order":
        p, g = parse_order(pred), parse_order(gold)
        return p is not None and p == g
    return normalize_text(pred) == normalize_text(gold)


def tolerance_for(meta: dict[str, Any], default: Tolerance = Tolerance()) -> Tolerance:
    """The default tolerance, widened by a sample's own `meta["tolerance"]` where it has one."""
    t = meta.get("tolerance") or {}
    return Tolerance(rel=max(default.rel, float(t.get("rel", 0.0))), abs=max(default.abs, float(t.get("abs", 0.0))),
                     iou=default.iou)


def check_sample(meta: dict[str, Any], prediction: str, tol: Tolerance = Tolerance()) -> bool:
    """`verify` against a sample's `meta["answer"]` with its type, choices and tolerance."""
    return verify(prediction, str(meta["answer"]), meta.get("answer_type", "text"), tolerance_for(meta, tol),
                  meta.get("choices"))


# ---- format checks and repairs (curation) ----------------------------------------------------


def think_structure(answer: str) -> str | None:
    """None when `answer` is a well-formed think or nothink answer, else a short reason. A think
    answer (one that starts with `<think>`) has exactly one `<think>...</think>`, at its very start,
    then a non-empty final answer; any other answer has no `<think>` or `</think>` anywhere."""
    a = answer.strip()
    if not a.startswith(THINK_START):
        a = a.removeprefix(NOTHINK_TOKEN).strip()
    starts, ends = a.count(THINK_START), a.count(THINK_END)
    if not a.startswith(THINK_START):
        return "think_not_at_start" if starts or ends else None
    if ends == 0:
        return "unclosed_think"
    if starts != 1 or ends != 1:
        return "repeated_think"
    if not a.partition(THINK_END)[2].strip():
        return "empty_answer"
    return None

_BRACKETED = re.compile(r"[\[(]\s*([-+\d.eE]+)\s*,\s*([-+\d.eE]+)\s*,\s*([-+\d.eE]+)\s*,\s*([-+\d.eE]+)\s*[\])]")
_PLAIN_NUMBER = re.compile(r"^[-+]?(?:\d+(?:\.\d+)?|\.\d+)$")


def check_format(answer: str, answer_type: str) -> str | None:
    """None when the final answer has the form `answer_type` needs, else a short reason."""
    a = final_answer(answer)
    if not a:
        return "empty_answer"
    if answer_type == "number":
        return None if _PLAIN_NUMBER.match(a) else "number_format" if parse_number(a) is not None else "number_missing"
    if answer_type == "box":
        if parse_box(a) is not None and re.fullmatch(r"\[(\s*\d\.\d{4}\s*,){3}\s*\d\.\d{4}\s*\]", a):
            return None
        return "box_format" if _BRACKETED.search(a) else "box_missing"
    if answer_type == "choice":
        return None if re.fullmatch(r"[A-Z]", a) else "choice_format" if parse_choice(a) else "choice_missing"
    if answer_type == "order":
        items = parse_order(a)
        if not items or len(items) < 2:
            return "order_missing"
        return None if a == ", ".join(items) else "order_format"
    return None


def repair_format(answer: str, answer_type: str, image_size: tuple[int, int] | None = None,
                  choices: list[str] | None = None) -> str | None:
    """A rewrite of `answer` whose final answer has the canonical form of its type, keeping any
    `<think>` part; None when no safe rewrite exists. `image_size` (width, height) lets a box in
    pixels become fractions."""
    full = answer.strip()
    c = parse_completion(full, "auto")
    if not c.finished:
        return None
    # the reasoning as it was written: everything up to its (first) </think>
    head = full.partition(THINK_END)[0] + THINK_END + "\n\n" if c.mode == "think" else ""
    a = _PREFIX.sub("", c.answer).strip()
    fixed = _repair_final(a, answer_type, image_size, choices)
    if fixed is None or check_format(fixed, answer_type) is not None:
        return None
    return head + fixed


def _repair_final(a: str, answer_type: str, image_size: tuple[int, int] | None, choices: list[str] | None) -> str | None:
    if answer_type == "number":
        t = a.replace("\u2212", "-").strip().rstrip(".")
        t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)
        return t if _PLAIN_NUMBER.match(t) else None
    if answer_type == "choice":
        c = parse_choice(a, choices)
        return c
    if answer_type == "order":
        items = parse_order(a)
        return ", ".join(items) if items and len(items) >= 2 else None
    if answer_type == "box":
        m = _BRACKETED.search(a)
        if not m or len(_BRACKETED.findall(a)) != 1:
            return None
        try:
            x1, y1, x2, y2 = (float(v) for v in m.groups())
        except ValueError:
            return None
        if max(x1, y1, x2, y2) > 1.0:  # pixels: only whole numbers inside a known image size
            if image_size is None or not all(float(v).is_integer() for v in (x1, y1, x2, y2)):
                return None
            w, h = image_size
            if not (0 <= min(x1, x2) and max(x1, x2) <= w and 0 <= min(y1, y2) and max(y1, y2) <= h):
                return None
            x1, x2, y1, y2 = x1 / w, x2 / w, y1 / h, y2 / h
        if min(x1, y1, x2, y2) < 0:
            return None
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        return "[" + ", ".join(f"{v:.4f}" for v in (x1, y1, x2, y2)) + "]"
    return a or None
