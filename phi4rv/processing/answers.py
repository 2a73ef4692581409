"""Reading and normalising answers: the rules that the data engine (verification, curation), eval
and training share, one copy each.

Two text comparisons, for two jobs: `normalize_text` is loose (quotes, surrounding punctuation and
a leading article go), for synthetic answers whose ground truth phi4rv wrote itself; `norm_text`
only folds case, whitespace, bold markers and one trailing period, for benchmark answers where
anything more would change what the benchmark counts as right. Two ways of reading numbers:
`to_number` reads a whole answer as one number (currency, `%`, thousands separators), `numbers_in`
finds the standalone numbers in free text, and `parse_number` takes the last number an answer
states, units glued to it included (`12cm` -> 12). The benchmarks' official normalisations stay
with their scorers (`eval.official`), as written in the benchmarks' own code.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# ---- text ---------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Loose comparison form: lower case, no quotes, whitespace collapsed, surrounding punctuation
    and brackets and a leading article removed."""
    t = text.strip().lower()
    t = re.sub(r"[\"'`]", "", t)
    t = re.sub(r"[\s]+", " ", t)
    t = t.strip(" .,:;!?()[]")
    t = re.sub(r"^(?:the|a|an) ", "", t)
    return t


def norm_text(s: str) -> str:
    """Case-insensitive comparison form: bold markers removed, whitespace collapsed, one trailing period
    removed."""
    s = re.sub(r"\s+", " ", s.replace("**", "").strip()).lower()
    return s[:-1].rstrip() if s.endswith(".") else s


# ---- numbers ------------------------------------------------------------------------------------

_NUM_BODY = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+"
_WHOLE_NUMBER = re.compile(r"([-+]?)\s*[$€£¥]?\s*(" + _NUM_BODY + r")\s*(%?)")
NUMBER_IN_TEXT = re.compile(r"(?<![\w.])[-+]?(?:" + _NUM_BODY + r")(?![\w])")


def to_number(text: str) -> float | None:
    """A whole string read as a number, else None.

    Accepted: thousands separators in groups of three (`1,000` → 1000), a leading currency sign,
    one trailing period, surrounding whitespace and bold markers, a trailing `%` (divides by 100,
    as lmms-eval's relaxed accuracy does: `45%` == 0.45, `45%` != 45).
    """
    t = text.replace("**", "").replace("−", "-").strip()
    if t.endswith(".") and not t.endswith(".."):
        t = t[:-1]
    m = _WHOLE_NUMBER.fullmatch(t)
    if not m:
        return None
    value = float(m.group(2).replace(",", ""))
    if m.group(1) == "-":
        value = -value
    return value / 100 if m.group(3) else value


def numbers_in(text: str) -> list[float]:
    """Every number in free text, in order (thousands separators understood)."""
    return [float(m.group(0).replace(",", "")) for m in NUMBER_IN_TEXT.finditer(text.replace("−", "-"))]


_NUM = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def parse_number(text: str) -> float | None:
    """The number an answer states: the whole answer when it is one number (with %, $, units or
    thousands separators around it), else the last number in it."""
    t = text.strip().replace("\u2212", "-").replace("\u2013", "-")
    matches = _NUM.findall(t)
    if not matches:
        return None
    try:
        return float(matches[-1].replace(",", ""))
    except ValueError:
        return None


# ---- points -------------------------------------------------------------------------------------


def point_in_box(point: tuple[float, float], box: Sequence[float]) -> bool:
    """Whether `point` (x, y) lies in `box` (x1, y1, x2, y2, in the same units), edges included."""
    x, y = point
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]
