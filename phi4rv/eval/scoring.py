"""Scoring rules shared by the tasks; each names the convention it follows."""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from phi4rv.eval.extract import final_span
from phi4rv.processing.answers import norm_text, numbers_in, to_number


@dataclass
class Scored:
    score: float  # 0..1
    parsed: bool  # False: nothing could be read from the answer (counted, scored 0)
    prediction: Any = None  # what was read, JSON-serialisable
    judged: bool = False  # the prediction came from the optional LLM judge


UNPARSED = Scored(0.0, False, None)


def relaxed_match(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    """ChartQA relaxed accuracy (lmms-eval / Pix2Struct): when both read as numbers and the target
    is non-zero, correct iff |pred − target| / |target| ≤ 5% (so years 2008 vs 2010 count as
    correct, as everywhere else); a zero target needs an exact zero; otherwise a case-insensitive
    exact string match. Numbers go through `to_number` (`1,000` == 1000, `45%` == 0.45)."""
    p, t = to_number(prediction), to_number(target)
    if p is not None and t is not None:
        return abs(p - t) <= tolerance * abs(t) if t != 0 else p == 0
    return norm_text(prediction) == norm_text(target)


def ocr_match(prediction: str, answers: Sequence[str], hme: bool = False) -> bool:
    """OCRBench: some gold answer is a substring of the prediction. Both are lower-cased and
    newlines become spaces; for HME100k rows (`hme`) all whitespace is removed and case kept."""
    for a in answers:
        if hme:
            if re.sub(r"\s+", "", a) in re.sub(r"\s+", "", prediction):
                return True
        elif a.lower().strip().replace("\n", " ") in prediction.lower().replace("\n", " "):
            return True
    return False


# ---- MMMU open questions ----------------------------------------------------------------------

_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def _key_responses(response: str) -> list[str]:
    """The official MMMU rule: in each sentence, the shortest text after an indicator word
    (and after "=" in the last sentence)."""
    response = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[a-z])|\n", response)
    keys = []
    for i, s in enumerate(sentences):
        indicators = _INDICATORS + (("=",) if i == len(sentences) - 1 else ())
        cands = [s.split(ind)[-1].strip() for ind in indicators if ind in s]
        if cands:
            best = min(cands, key=len)
            if best and best not in (":", ",", ".", "!", "?", ";", "'"):
                keys.append(best)
    return keys or [response]


def _normalise(value: str | float) -> list[str | float]:
    if isinstance(value, (int, float)):
        return [round(float(value), 2)]
    s = value.strip().rstrip(".").strip()
    n = to_number(s)
    if n is not None:
        return [round(n, 2)]
    s = s.lower()
    return [" " + s, s + " "] if len(s) == 1 else [s]  # a one-letter answer must stand alone


def mmmu_open_match(response: str, gold: str | list[str]) -> tuple[bool, list]:
    """MMMU open-question rule (official `parse_open_response` / `eval_open`): key sub-answers and
    the numbers in them, numbers compared rounded to 2 places, strings by containment."""
    keys = _key_responses(response)
    preds: list[str | float] = []
    for k in keys:
        preds += _normalise(k)
        for n in numbers_in(k):
            preds += _normalise(n)
    golds: list[str | float] = []
    for g in parse_listish(gold):
        golds += _normalise(g)
    for p in preds:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in golds):
                return True, keys
        elif p in golds:
            return True, keys
    return False, keys


def parse_listish(value: Any) -> list:
    """A gold answer that may be a list, or a string holding a Python list ("['a', 'b']")."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = ast.literal_eval(value.strip())
            if isinstance(parsed, list):
                return parsed
        except (ValueError, SyntaxError):
            pass
    return [value]


# ---- MathVista free-form ----------------------------------------------------------------------


def free_form_value(answer: str) -> str | None:
    """A free-form answer's value: the final span if it reads as a number, else the last number
    in it, else the final span itself (for text answers); None when empty."""
    span = final_span(answer)
    if not span:
        return None
    if to_number(span) is not None:
        return span
    nums = numbers_in(span)
    return repr(nums[-1]) if nums else span


def normalise_mathvista(value: str, answer_type: str, precision: int | None) -> str | None:
    """MathVista's normalisation: integer → str(int(x)); float → str(round(x, precision));
    list → the numbers, comma-joined; text → stripped. None if a number was needed and absent."""
    if answer_type in ("integer", "float"):
        n = to_number(value)
        if n is None:
            nums = numbers_in(value)
            if not nums:
                return None
            n = nums[-1]
        if answer_type == "integer":
            return str(int(n))
        return str(round(n, int(precision) if precision is not None else 2))
    if answer_type == "list":
        nums = numbers_in(value)
        return ",".join(repr(float(x)) for x in nums) if nums else None
    return value.strip()


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def nearest_option(text: str, options: Sequence[str], max_ratio: float = 0.5) -> int | None:
    """Index of the option nearest `text` by edit distance (case-insensitive), if that distance is
    at most `max_ratio` of the option's length and no other option is as near; else None."""
    t = norm_text(text)
    dists = [edit_distance(t, norm_text(str(o))) for o in options]
    best = min(dists)
    i = dists.index(best)
    if dists.count(best) > 1 or best > max_ratio * max(1, len(norm_text(str(options[i])))):
        return None
    return i
