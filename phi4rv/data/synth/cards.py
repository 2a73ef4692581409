"""Number cards: a row of white cards, each with one black digit, named by their place from the
left ("the second card"). Small enough for the tiny recipe's CPU model to learn to read, yet the
reasoning tasks need several readings combined.

The cards have no colours and stand in one row on purpose. With coloured faces the colour took
83% of the tiny encoder's patch-feature variance (the digit 15%) and the tiny decoder never learned
to read the digits in the recipe's budget (card_digit 9-20%, chance 11%); with white cards in rows
at random heights it read them partly (35-40%); with white cards in one row, 77-82% after 6
epochs of stage 2 and 84-87% after 12.

Every sample's meta carries `reading`, the cards left to right as written in the traces
("first 4, second 7, third 2"), so a direct answer can be given a think trace and back
(`phi4rv.recipe.data.as_mode`), and captions for contrastive pretraining come from the same words.
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image, ImageDraw

from phi4rv.data.synth.common import BLACK, WHITE, Difficulty, Drawn, font

PLACES = ("first", "second", "third", "fourth", "fifth")
EDGE = (110, 110, 110)
BACKGROUNDS = {"white": WHITE, "light gray": (228, 228, 228), "cream": (250, 243, 224)}


def cards_scene(rng: random.Random, d: Difficulty, n: int | None = None) -> dict[str, Any]:
    n = max(2, min(len(PLACES), n if n is not None else d.pick(rng, "elements")))
    size = d.pick(rng, "font_size")
    if d.grid:  # sides, gaps and places in whole grid units, no margin
        g, side, gap, margin = d.grid, -(-round(size * 1.3) // d.grid) * d.grid, d.grid, 0
    else:
        g, side, gap = 1, int(size * 1.5) + rng.randint(0, 3), rng.randint(2, max(2, size // 3))
        margin = gap
    W = max(d.pick(rng, "width") // g * g, n * side + (n - 1) * gap + 2 * margin)
    H = max(d.pick(rng, "height") // g * g, side + 2 * margin)
    slack = (W - (n * side + (n - 1) * gap + 2 * margin)) // g  # spare width, spread over the gaps at random
    extra = sorted(rng.randint(0, slack) * g for _ in range(n))
    cards = []
    y = rng.randint(margin // g, (H - side - margin) // g) * g  # one row: left to right is reading order
    for i, digit in enumerate(rng.sample(range(1, 10), n)):
        x = margin + i * (side + gap) + extra[i]
        cards.append({"place": PLACES[i], "digit": digit, "box": [x, y, x + side, y + side]})
    return {"type": "cards", "width": W, "height": H, "background": rng.choice(list(BACKGROUNDS)),
            "font_size": size, "cards": cards}


def draw_cards(scene: dict[str, Any]) -> Image.Image:
    img = Image.new("RGB", (scene["width"], scene["height"]), BACKGROUNDS[scene["background"]])
    dr = ImageDraw.Draw(img)
    for c in scene["cards"]:
        x1, y1, x2, y2 = c["box"]
        dr.rectangle([x1, y1, x2 - 1, y2 - 1], fill=WHITE, outline=EDGE)
        dr.text(((x1 + x2) / 2, (y1 + y2) / 2), str(c["digit"]), fill=BLACK, font=font(scene["font_size"]), anchor="mm")
    return img


def reading(scene: dict[str, Any]) -> str:
    return ", ".join(f"{c['place']} {c['digit']}" for c in scene["cards"])


def _drawn(scene: dict[str, Any], question: str, answer: Any, answer_type: str, trace: str | None = None) -> Drawn:
    return Drawn([draw_cards(scene)], question, str(answer), answer_type, scene, trace=trace,
                 extra={"reading": reading(scene)})


def sum_trace(digits: list[int]) -> tuple[str, int]:
    """Running sum, one addition per line: "4+7=11\\n11+2=13"."""
    lines, total = [], digits[0]
    for v in digits[1:]:
        lines.append(f"{total}+{v}={total + v}")
        total += v
    return "\n".join(lines), total


# ---- tasks -----------------------------------------------------------------------------------


def card_digit(rng: random.Random, d: Difficulty) -> Drawn:
    scene = cards_scene(rng, d)
    c = rng.choice(scene["cards"])
    return _drawn(scene, f"What number is on the {c['place']} card?", c["digit"], "number")


def card_place(rng: random.Random, d: Difficulty) -> Drawn:
    scene = cards_scene(rng, d)
    c = rng.choice(scene["cards"])
    return _drawn(scene, f"Which card shows the number {c['digit']}?", c["place"], "text")


def card_count(rng: random.Random, d: Difficulty) -> Drawn:
    scene = cards_scene(rng, d)
    return _drawn(scene, "How many cards are there?", len(scene["cards"]), "number")


def card_sum(rng: random.Random, d: Difficulty) -> Drawn:
    scene = cards_scene(rng, d)
    steps, total = sum_trace([c["digit"] for c in scene["cards"]])
    return _drawn(scene, "What is the sum of the numbers on the cards?", total, "number",
                  trace=f"{reading(scene)}\n{steps}")


def card_product(rng: random.Random, d: Difficulty) -> Drawn:
    scene = cards_scene(rng, d)
    a, b = rng.sample(scene["cards"], 2)
    p = a["digit"] * b["digit"]
    return _drawn(scene, f"What is the {a['place']} number times the {b['place']} number?", p, "number",
                  trace=f"{reading(scene)}\n{a['digit']}*{b['digit']}={p}")
