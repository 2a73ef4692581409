"""The official scoring rules, on hand-labelled cases: each expected value is what the official
scorer returns for that input, worked out from its code (named in each test). The official code
itself cannot be a test dependency here (lmms-eval pulls a CUDA torch and dozens of packages;
MMMU's and MathVista's scorers are scripts, not packages)."""

import pytest

from phi4rv.eval.official import (
    ai2d_letter,
    chartqa_relaxed,
    mathvista_normalize,
    mmmu_eval_open,
    mmmu_extract_numbers,
    mmmu_parse_choice,
    mmmu_parse_open,
    mmmu_random_choice,
    ocrbench_match,
    screenspot_click,
)


# lmms-eval chartqa/utils.py::relaxed_correctness: float() on both, `%` divides by 100, 5% of a
# non-zero target, else `prediction.lower() == target.lower()`.
@pytest.mark.parametrize("pred,target,ok", [
    ("1000", "1000", True),
    ("1049", "1000", True),  # 4.9%
    ("1051", "1000", False),  # 5.1%
    ("2010", "2008", True),  # years are numbers
    ("45%", "0.45", True),
    ("45", "0.45", False),
    ("2%", "2", False),
    ("1,000", "1000", False),  # float("1,000") fails; strings differ
    ("1,000", "1,000", True),  # ... but the same string matches
    ("$5", "5", False),
    ("12 units", "12", False),
    ("Blue.", "blue", False),  # no trailing-period normalisation
    ("BLUE", "blue", True),
    ("0", "0", True),  # a zero target: string comparison
    ("0.0", "0", False),
    ("0.01", "0", False),
    (" 12 ", "12", True),  # float() allows surrounding spaces
])
def test_chartqa_relaxed_correctness(pred, target, ok):
    assert chartqa_relaxed(pred, target) is ok


LETTERS, OPTIONS = ["A", "B", "C", "D"], ["Mona Lisa", "The Scream", "Starry Night", "Guernica"]


# MMMU eval_utils.py::parse_multi_choice_response (without the random fallback).
@pytest.mark.parametrize("response,letter", [
    ("(B)", "B"),
    ("The answer is (C).", "C"),
    ("B", "B"),  # " B " after padding
    ("B.", "B"),  # "." stripped from the ends first
    ("Answer: B", "B"),
    ("(A) is wrong, the answer is (D)", "D"),  # several "(X)": the last occurrence
    ("A or B", "B"),  # several " X ": the last
    ("B. Because it screams", None),  # "B." inside: neither "(B)" nor " B "
    ("I think it is Starry Night by van Gogh", "C"),  # over 5 words: option text
    ("Starry Night", None),  # option text only counts in answers over 5 words
    ("the painting shows the scream, not mona lisa at all", "A"),  # by text: the last occurrence wins
    ("", None),
    ("b", None),  # case-sensitive letters
])
def test_mmmu_multiple_choice_parser(response, letter):
    assert mmmu_parse_choice(response, LETTERS, OPTIONS) == letter


def test_mmmu_random_fallback_is_seeded_per_sample():
    draws = {mmmu_random_choice(LETTERS, f"validation_Art_{i}") for i in range(40)}
    assert draws == set(LETTERS)  # a real draw over the options ...
    assert all(mmmu_random_choice(LETTERS, f"validation_Art_{i}") == mmmu_random_choice(LETTERS, f"validation_Art_{i}")
               for i in range(40))  # ... the same for the same sample every time


# MMMU eval_utils.py::extract_numbers / parse_open_response / eval_open.
def test_mmmu_extract_numbers():
    # the official "simple" pattern also finds the tails "234" of "1,234" and "3" of "5e3"
    assert mmmu_extract_numbers("from 1,234 to 5e3 then -2.5 and 7") == ["1,234", "5e3", "234", "3", "-2.5", "7"]


@pytest.mark.parametrize("response,gold,ok", [
    ("Therefore x = 12.", "12", True),
    ("x = 12.004", "12", True),  # rounded to 2 places: 12.0
    ("x = 12.01", "12", False),
    ("The answer is 1,200", "1200", True),
    ("The force is 3 N", "3", True),
    ("The colour is dark red", "red", True),  # strings by containment
    ("so the answer is a", "A", True),  # a one-letter gold must stand alone: " a"
    ("it is bad", "A", False),
    # the official split is on newlines only (its ". " split looks for a capital in lower-cased text):
    # the shortest tail after an indicator in the one sentence is "7", so "12" is not a key
    ("The result is 12. So we subtract 5 to get 7", "12", False),
    ("The result is 12\nSo we subtract 5 to get 7", "12", True),
])
def test_mmmu_open_rule(response, gold, ok):
    assert mmmu_eval_open([gold], mmmu_parse_open(response)) is ok


def test_mmmu_open_parse_keeps_key_texts_and_numbers():
    assert set(mmmu_parse_open("Thus the area is 24 cm")) == {"24 cm", 24.0}


# MathVista calculate_score.py::normalize_extracted_answer, compared with the gold as given.
@pytest.mark.parametrize("extraction,choices,answer_type,precision,expected", [
    ("B", ["3 cm", "5 cm", "7 cm"], "text", None, "5 cm"),
    ("(C) 7 cm", ["3 cm", "5 cm", "7 cm"], "text", None, "7 cm"),
    ("(b)", ["3 cm", "5 cm", "7 cm"], "text", None, "5 cm"),  # "(x)" is upper-cased
    ("b", ["3 cm", "5 cm", "7 cm"], "text", None, "3 cm"),  # a bare lower-case letter is not a letter: nearest text
    ("5", ["3 cm", "5 cm", "7 cm"], "text", None, "5 cm"),  # nearest option at any distance
    ("banana", ["3 cm", "5 cm", "7 cm"], "text", None, "3 cm"),  # ties: the first
    ("12.0", None, "integer", None, "12"),
    ("12.9", None, "integer", None, "12"),  # int() truncates
    ("twelve", None, "integer", None, None),
    ("1.449", None, "float", 2, "1.45"),
    ("1.2", None, "float", 2, "1.2"),  # so a gold "1.20" is never matched
    ("3", None, "float", 1, "3.0"),
    ("[1, 2, 3]", None, "list", None, "[1, 2, 3]"),
])
def test_mathvista_normalisation(extraction, choices, answer_type, precision, expected):
    assert mathvista_normalize(extraction, choices, answer_type, precision) == expected


# SeeClick / ScreenSpot-v2 evaluation: a box's centre, corners in any order.
def test_screenspot_click_point():
    assert screenspot_click([10, 20]) == (10, 20)
    assert screenspot_click([10, 20, 30, 40]) == (20, 30)
    assert screenspot_click([30, 40, 10, 20]) == (20, 30)


# OCRBench: substring, lower-cased; HME100k keeps case and drops spaces and newlines.
@pytest.mark.parametrize("pred,answers,hme,ok", [
    ("The sign reads STOP here", ["stop"], False, True),
    ("The sign reads ST OP", ["stop"], False, False),
    ("line one\nline two", ["one line"], False, True),  # newlines read as spaces
    ("x ^ { 2 } + 1", ["x^{2}+1"], True, True),
    ("X^{2}+1", ["x^{2}+1"], True, False),  # case kept for HME100k
    ("x^{2}\t+1", ["x^{2}+1"], True, False),  # only spaces and newlines are removed
    ("GO", ["stop", "go"], False, True),
])
def test_ocrbench_rule(pred, answers, hme, ok):
    assert ocrbench_match(pred, answers, hme) is ok


# lmms-eval ai2d.yaml: a leading "X." gives X, else the whole response; exact match ignoring case
# and punctuation.
@pytest.mark.parametrize("response,letter", [
    ("B", "B"),
    ("b", "B"),
    ("B.", "B"),
    ("(B)", "B"),
    ("C. rabbit", "C"),
    ("  D. sun", "D"),
    ("The answer is B", "THE ANSWER IS B"),  # not a letter: wrong
    ("B rabbit", "B RABBIT"),
])
def test_ai2d_letter(response, letter):
    assert ai2d_letter(response) == letter
