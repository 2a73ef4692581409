"""The shared answer normalisations (`processing.answers`): each rule on the cases that tell it
apart from the other."""

import pytest

from phi4rv.processing.answers import norm_text, normalize_text, numbers_in, parse_number, point_in_box, to_number


@pytest.mark.parametrize("text, loose, strict", [
    ("The Red Circle.", "red circle", "the red circle"),
    ('  "Paris"  ', "paris", '"paris"'),
    ("**Yes**.", "**yes**", "yes"),
    ("a  b\n c", "b c", "a b c"),
    ("(B)", "b", "(b)"),
    ("etc..", "etc", "etc."),  # one trailing period only, in the strict form
])
def test_loose_and_strict_text_forms(text, loose, strict):
    assert normalize_text(text) == loose
    assert norm_text(text) == strict


@pytest.mark.parametrize("text, whole, found, last", [
    ("1,000", 1000.0, [1000.0], 1000.0),
    ("12cm", None, [], 12.0),  # a unit glued on: not a standalone number, but the answer's number
    ("−3.5", -3.5, [-3.5], -3.5),
    ("from 2 to 5", None, [2.0, 5.0], 5.0),
    ("45%", 0.45, [45.0], 45.0),
    ("none", None, [], None),
])
def test_number_readings(text, whole, found, last):
    assert (to_number(text), numbers_in(text), parse_number(text)) == (whole, found, last)


def test_point_in_box_includes_edges():
    box = (50, 20, 90, 50)
    assert point_in_box((70, 35), box) and point_in_box((90, 50), box) and point_in_box((50, 20), box)
    assert not point_in_box((90.01, 35), box) and not point_in_box((70, 19.99), box)
