"""The benchmarks' official scoring rules, written here from the official scorers' documented
behaviour (their code is not imported: lmms-eval pulls a CUDA torch and dozens of packages).

Each function names the scorer it follows. These are the default rules (`rules="official"`), so
numbers compare with published ones; `rules="lenient"` keeps phi4rv's kinder extraction
(`extract`, `scoring`). Hand-labelled cases for every rule: `tests/test_eval_official.py`.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence

from phi4rv.eval.scoring import edit_distance

RULES = ("official", "lenient")


# ---- ChartQA: relaxed accuracy (lmms-eval `chartqa/utils.py::relaxed_correctness`, from Pix2Struct) --


def _chartqa_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def chartqa_relaxed(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """The raw answer against the target: both read by Python's `float` (a trailing `%` divides by
    100; `1,000`, `$5` or `12 units` do not read); when both read and the target is non-zero,
    correct iff |pred − target| / |target| ≤ 5%; otherwise (a zero target included) a
    case-insensitive exact string match."""
    p, t = _chartqa_float(prediction), _chartqa_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


# ---- MMMU (MMMU-Benchmark/MMMU `mmmu/utils/eval_utils.py`) ------------------------------------


def mmmu_parse_choice(response: str, letters: Sequence[str], options: Sequence[str]) -> str | None:
    """`parse_multi_choice_response` without its random fallback (None instead): punctuation
    stripped from the ends, then every "(X)"; else every " X " (space on both sides); else, for
    answers over 5 words, every option text contained (case-insensitive). Several candidates →
    the one whose last occurrence comes last."""
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = " " + response + " "
    by_text = False
    cands = [c for c in letters if f"({c})" in response]
    bracket = bool(cands)
    if not cands:
        cands = [c for c in letters if f" {c} " in response]
    if not cands and len(response.split()) > 5:
        cands = [c for c, o in zip(letters, options) if str(o).lower() in response.lower()]
        by_text = True
    if not cands:
        return None
    if len(cands) == 1:
        return cands[0]
    if by_text:
        starts = [response.lower().rfind(str(options[letters.index(c)]).lower()) for c in cands]
    elif bracket:
        starts = [response.rfind(f"({c})") for c in cands]
    else:
        starts = [response.rfind(f" {c} ") for c in cands]
    return cands[starts.index(max(starts))]  # numpy argmax: the first of equal maxima


def mmmu_random_choice(letters: Sequence[str], sample_id: str, seed: int = 42) -> str:
    """The official fallback for an unparsed answer is `random.choice(all_choices)` under
    `random.seed(42)`, drawn in file order. Here the draw is seeded per sample (42 and the id) so
    a score does not depend on which samples ran before it or in which order."""
    return random.Random(f"{seed}:{sample_id}").choice(list(letters))


_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = (":", ",", ".", "!", "?", ";", "'")


def _mmmu_key_responses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    # the official split looks for a capital after ". " in lower-cased text, so only newlines split
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for i, part in enumerate(parts):
        indicators = _INDICATORS + (("=",) if i == len(parts) - 1 else ())
        shortest = None
        for ind in indicators:
            if ind in part:
                tail = part.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def mmmu_extract_numbers(text: str) -> list[str]:
    """`extract_numbers`: numbers with thousands commas, then scientific, then plain ones."""
    return _COMMAS.findall(text) + _SCIENTIFIC.findall(text) + _SIMPLE.findall(text)


def mmmu_normalize(text: str) -> list[str | float]:
    """`normalize_str`: a number (commas removed) → its float rounded to 2 places; else the
    lower-cased string, a one-character string padded with a space on either side."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        pass
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def mmmu_parse_open(response: str) -> list[str | float]:
    """`parse_open_response`: key sub-answers and the numbers in them, normalised, deduplicated."""
    keys = _mmmu_key_responses(response)
    preds: list[str] = list(keys)
    for k in keys:
        preds += mmmu_extract_numbers(k)
    out: list[str | float] = []
    for p in preds:
        out += mmmu_normalize(p)
    return list(dict.fromkeys(out))


def mmmu_eval_open(golds: Sequence[str], preds: Sequence[str | float]) -> bool:
    """`eval_open`: a string prediction contains some string gold; a number equals some gold."""
    norm: list[str | float] = []
    for g in golds:
        norm += mmmu_normalize(str(g))
    for p in preds:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in norm):
                return True
        elif p in norm:
            return True
    return False


# ---- MathVista (lupantech/MathVista `evaluation/calculate_score.py`) ---------------------------


def mathvista_normalize(extraction: str, choices: Sequence[str] | None, answer_type: str,
                        precision: int | None) -> str | None:
    """`normalize_extracted_answer`: multiple choice → the letter in "(X)" or a bare letter picks
    its option, else the option nearest by Levenshtein distance (case-sensitive, at any
    distance, the first of ties); integer → str(int(float(x))); float → str(round(float(x),
    int(precision))); list → str(x); None when the number does not read. Free-form text answers
    (which testmini does not have) compare as stripped strings."""
    if choices:
        extraction = extraction.strip()
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        letters = [chr(65 + i) for i in range(len(choices))]
        if extraction in letters:
            return choices[letters.index(extraction)]
        dists = [edit_distance(extraction, c) for c in choices]
        return choices[dists.index(min(dists))]
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision if precision is not None else 0)))
    except (ValueError, OverflowError):
        return None
    return str(extraction).strip() if answer_type == "text" else str(extraction)


# ---- ScreenSpot (SeeClick / OS-Copilot ScreenSpot-v2 evaluation) ------------------------------


def screenspot_click(box_or_point: Sequence[float]) -> tuple[float, float]:
    """The click point: a point as is, a box's centre ((x1 + x2) / 2, (y1 + y2) / 2) whatever
    the corners' order."""
    if len(box_or_point) == 2:
        return box_or_point[0], box_or_point[1]
    x1, y1, x2, y2 = box_or_point
    return (x1 + x2) / 2, (y1 + y2) / 2


# ---- OCRBench (Yuliang-Liu/MultimodalOCR `OCRBench/scripts`, lmms-eval `ocrbench/utils.py`) ------


def ocrbench_match(prediction: str, answers: Sequence[str], hme: bool = False) -> bool:
    """Some gold answer is a substring of the prediction. HME100k: both stripped, newlines →
    spaces, spaces removed, case kept. Others: both lower-cased, stripped, newlines → spaces."""
    for a in answers:
        if hme:
            if a.strip().replace("\n", " ").replace(" ", "") in prediction.strip().replace("\n", " ").replace(" ", ""):
                return True
        elif a.lower().strip().replace("\n", " ") in prediction.lower().strip().replace("\n", " "):
            return True
    return False


# ---- AI2D (lmms-eval `ai2d.yaml`: MultiChoiceRegexFilter + exact_match) -------------------------

_AI2D_LEADING = re.compile(r"^\s*([A-Z])\.")
_PUNCT = str.maketrans("", "", string.punctuation)


def ai2d_letter(response: str) -> str:
    """What lmms-eval compares with the gold letter: the letter of a leading "X." if there is
    one, else the whole response; then exact match ignoring case and punctuation (so "B",
    "b", "(B)" and "B." count, "The answer is B" does not). Returned upper-cased, stripped."""
    m = _AI2D_LEADING.match(response)
    text = m.group(1) if m else response
    return text.translate(_PUNCT).strip().upper()
