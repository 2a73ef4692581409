"""Answer extraction and scoring rules, including the traps users hit in other harnesses."""

import pytest

from phi4rv.eval.extract import extract_choice, extract_click, final_span
from phi4rv.eval.scoring import mmmu_open_match, nearest_option, ocr_match, relaxed_match
from phi4rv.processing.answers import point_in_box, to_number
from phi4rv.processing.reasoning import parse_completion

ABCD = ["A", "B", "C", "D"]


# ---- numbers / ChartQA relaxed accuracy --------------------------------------------------------


@pytest.mark.parametrize("text,value", [
    ("1,000", 1000.0), ("1000", 1000.0), ("12.", 12.0), ("$3.50", 3.5), ("-2.5", -2.5),
    ("45%", 0.45), ("**7**", 7.0), ("1,2", None), ("12 apples", None), ("", None),
])
def test_to_number(text, value):
    assert to_number(text) == value


@pytest.mark.parametrize("pred,target,ok", [
    ("1,000", "1000", True),      # thousands separator normalised (lmms-eval would fail it)
    ("1000", "1,000", True),
    ("45%", "0.45", True),        # % divides by 100, as lmms-eval does
    ("45%", "45", False),         # ... so a percentage against a bare number fails (documented)
    ("0.45", "45", False),
    ("12.", "12", True),          # trailing period
    ("Yes.", "yes", True),
    ("2010", "2008", True),       # years are numbers: within 5% of the target counts (the standard rule)
    ("104", "100", True), ("106", "100", False),   # the target is the denominator
    ("95", "100", True), ("94.9", "100", False),
    ("0", "0", True), ("0.1", "0", False),
    ("Blue", "blue", True), ("light blue", "blue", False),
])
def test_relaxed_match(pred, target, ok):
    assert relaxed_match(pred, target) is ok


@pytest.mark.parametrize("answer,span", [
    ("The answer is 1000.", "1000"),
    ("Reading the chart, the value is high.\nFinal answer: **1,000**", "1,000"),
    ("so it is \\boxed{\\frac{1}{2}} overall", "\\frac{1}{2}"),
    ("42", "42"),
])
def test_final_span(answer, span):
    assert final_span(answer) == span


# ---- multiple choice ---------------------------------------------------------------------------


@pytest.mark.parametrize("answer,letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("The answer is (B)", "B"), ("The answer is (B).", "B"),
    ("Answer: B", "B"), ("\\boxed{C}", "C"), ("**C**", "C"), ("the correct option is D", "D"),
    # answer first, then an explanation that names other letters
    ("B. Because A and C contradict the figure.", "B"),
    ("(C) 12 cm, since (A) is too short", "C"),
    # answer last
    ("A and C contradict the figure, so B", "B"),
    ("Options (A) and (B) are wrong, which leaves (D)", "D"),
    # an explicit statement wins over letters around it
    ("(A) looks plausible but the answer is C, not D", "C"),
    # "A" / "I" as words are not choices
    ("A dog is shown, so D", "D"),
    ("I think it is B", "B"),
    ("A dog is shown.", None),
    ("I cannot tell", None),
    ("E", None),  # not among the choices
    ("", None),
])
def test_extract_choice(answer, letter):
    assert extract_choice(answer, ABCD) == letter


def test_think_text_with_a_wrong_letter_does_not_count():
    s = parse_completion("<think>At first (A) seemed right. The answer is A? No.</think>\n\nThe answer is (C).", "auto")
    assert extract_choice(s.answer, ABCD) == "C"


def test_extract_choice_by_option_text():
    options = ["12 cm", "2 cm", "red", "a red circle"]
    assert extract_choice("2 cm", ABCD, options) == "B"
    assert extract_choice("It measures 12 cm", ABCD, options) == "A"   # "2 cm" is only part of "12 cm"
    assert extract_choice("the shape is a red circle", ABCD, options) == "D"  # "red" only inside the longer option
    assert extract_choice("green", ABCD, options) is None
    assert extract_choice("2 CM .", ABCD, options) == "B"  # case, space and a final period folded


def test_nearest_option_only_when_close():
    opts = ["5 cm", "7 cm", "triangle"]
    assert nearest_option("5cm", opts) == 0
    assert nearest_option("triangel", opts) == 2
    assert nearest_option("I do not know the answer", opts) is None


# ---- MMMU open / OCRBench ----------------------------------------------------------------------


def test_mmmu_open_rule():
    assert mmmu_open_match("So the total is 12.004 dollars", "12")[0]
    assert mmmu_open_match("x = 3.14159", "3.14")[0]
    assert not mmmu_open_match("The answer is 13", "12")[0]
    assert mmmu_open_match("Therefore it is the mitochondria.", "mitochondria")[0]
    assert mmmu_open_match("the result is 24/7", "['24/7', '3.429']")[0]


def test_ocr_substring_rule():
    assert ocr_match("The sign says STOP here", ["stop"])
    assert ocr_match("HELLO\nWORLD", ["hello world"])  # newlines read as spaces
    assert not ocr_match("hello", ["hello world"])
    assert ocr_match("x ^ { 2 } + 1", ["x^{2}+1"], hme=True)
    assert not ocr_match("X^{2}+1", ["x^{2}+1"], hme=True)  # HME100k keeps case


# ---- boxes and points (ScreenSpot convention) --------------------------------------------------

W, H = 200, 100
TARGET = (50, 20, 90, 50)  # pixels x1, y1, x2, y2 (ScreenSpot's [x, y, w, h] = [50, 20, 40, 30])


def test_click_fraction_convention():
    p = extract_click("[0.3, 0.3, 0.4, 0.4]", W, H)  # centre (0.35, 0.35) -> (70, 35) px
    assert p == pytest.approx((70.0, 35.0)) and point_in_box(p, TARGET)
    assert extract_click("click (0.45, 0.5)", W, H) == pytest.approx((90.0, 50.0))
    assert point_in_box((90.0, 50.0), TARGET)  # edges included


def test_click_pixels_are_not_guessed_as_fractions():
    # the same box in pixels: under the fraction convention it is out of range -> unparsed
    assert extract_click("[60, 30, 80, 40]", W, H) is None
    assert extract_click("[60, 30, 80, 40]", W, H, coords="pixel") == pytest.approx((70.0, 35.0))
    # 0-1000: 350/1000 of 200 px = 70
    assert extract_click("[300, 300, 400, 400]", W, H, coords="thousand") == pytest.approx((70.0, 35.0))
    assert extract_click("[300, 300, 400, 400]", W, H, coords="pixel") is None  # beyond the 200x100 image


def test_click_rejects_inverted_boxes_and_uses_the_last_one():
    assert extract_click("[0.5, 0.5, 0.4, 0.6]", W, H) is None
    assert extract_click("first [0.0, 0.0, 0.1, 0.1] then [0.3, 0.3, 0.4, 0.4]", W, H) == pytest.approx((70.0, 35.0))
    assert extract_click("no box here", W, H) is None
