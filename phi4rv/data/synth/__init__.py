"""Synthetic, text-rich training and evaluation data with exact answers.

Public API (what the data CLI, curation, teacher synthesis and the synthetic benchmark use):

    from phi4rv.data.synth import GENERATORS, DIFFICULTIES, Difficulty, with_knobs

    gen = GENERATORS["chart_value"]              # one entry per task
    sample = gen.generate(seed=7, difficulty="tiny")   # -> phi4rv.data.formats.Sample
    gen.kind                                     # "perception" or "reasoning"

    hard = with_knobs("default", elements=(10, 14), font_size=(9, 11))   # custom knobs
    sample = gen.generate(7, hard)

    from phi4rv.data import verify
    verify.check_sample(sample.meta, model_output)        # -> bool, uses the sample's tolerance

`generate` is pure: the same (seed, difficulty) gives byte-identical PNGs and an equal Sample.
Every Sample has one user turn (`<image>\\n` per image, then the question) and one assistant turn:
the bare answer for perception tasks (mode "nothink"; training adds the nothink marker itself), or
`<think>\\n{trace}\\n</think>\\n\\n{answer}` for reasoning tasks (mode "think"), the trace written
from the scene. `sample.meta` holds:

    task, kind, mode        e.g. "chart_sum", "reasoning", "think"
    answer, answer_type     the exact final answer as a string; "number" | "text" | "choice" | "box" | "order"
    scene                   the JSON-serialisable description the image(s) were drawn from
    seed, generator         the seed and the generator family (module) name; also source="synth"
    difficulty, knobs       the difficulty's name and its knobs: with `seed`, enough to draw the sample again
    choices                 (choice tasks) the option texts, lettered A, B, ... in the question
    tolerance               (optional) {"abs": x} or {"rel": r} when the answer must be read off an axis

Boxes are `[x1, y1, x2, y2]` fractions of width/height with 4 decimals (DESIGN.md §3); orders are
comma-separated image numbers or letters ("2, 3, 1"). Difficulty presets: "tiny" (112-160 px,
2-3 elements, big text: learnable by a ~10M-parameter model), "default", "hard".
"""

from __future__ import annotations

from phi4rv.data.formats import Sample
from phi4rv.data.synth import captions, cards, charts, geometry, multi, tables, ui
from phi4rv.data.synth.common import (
    DIFFICULTIES,
    Difficulty,
    Drawn,
    Generator,
    difficulty_of,
    get_difficulty,
    with_knobs,
)

_TASKS = [
    ("chart_value", charts, "perception", "read one value off a bar, line or pie chart"),
    ("chart_compare", charts, "reasoning", "difference, larger of two, highest/lowest"),
    ("chart_sum", charts, "reasoning", "sum of several values"),
    ("chart_trend", charts, "reasoning", "largest rise, change from first to last (line charts)"),
    ("table_lookup", tables, "perception", "read a cell; find the row with a value"),
    ("table_total", tables, "reasoning", "column total, difference of two rows, row with the maximum"),
    ("doc_field", tables, "perception", "read a receipt's date, number, store or a unit price"),
    ("receipt_total", tables, "reasoning", "amount to pay (quantity x price), number of units"),
    ("geometry_area", geometry, "reasoning", "area of a rectangle, right triangle, circle or trapezoid"),
    ("geometry_length", geometry, "reasoning", "hypotenuse, perimeter"),
    ("geometry_angle", geometry, "reasoning", "third angle of a triangle"),
    ("math_expr", geometry, "reasoning", "evaluate a rendered arithmetic expression"),
    ("ui_ground", ui, "perception", "box of a named button, field, icon or tab"),
    ("ui_click_effect", ui, "reasoning", "what clicking a point does (multiple choice)"),
    ("caption", captions, "perception", "detailed description of a shapes scene, chart, table or screen"),
    ("multi_diff", multi, "perception", "what changed between two images (multiple choice)"),
    ("multi_order", multi, "reasoning", "order scrambled frames of a process"),
    ("multi_match", multi, "perception", "match images to captions"),
    ("card_digit", cards, "perception", "the digit on the card at a named place"),
    ("card_place", cards, "perception", "the place of the card with a given digit"),
    ("card_count", cards, "perception", "how many cards"),
    ("card_sum", cards, "reasoning", "sum of the digits on all cards"),
    ("card_product", cards, "reasoning", "product of the digits on two cards named by place"),
]

GENERATORS: dict[str, Generator] = {
    name: Generator(name, module.__name__.rsplit(".", 1)[-1], kind, getattr(module, name), doc)
    for name, module, kind, doc in _TASKS
}



def regenerate(meta: dict) -> Sample | None:
    """The sample a synthetic sample's `meta` (task, seed, difficulty) says it is, drawn again by its
    generator: its scene, question and answer as the generator derives them. None when the meta
    does not name a generator, a seed and a difficulty."""
    gen = GENERATORS.get(str(meta.get("task")))
    d = difficulty_of(meta)
    if gen is None or d is None or meta.get("source") != "synth" or not isinstance(meta.get("seed"), int):
        return None
    return gen.generate(meta["seed"], d)


__all__ = ["regenerate", "GENERATORS", "DIFFICULTIES", "Difficulty", "Drawn", "Generator", "get_difficulty", "with_knobs"]
