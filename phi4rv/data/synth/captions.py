"""Detailed captions written from the scene: simple shape scenes (also the building block of the
multi-image sets) and the other families' scenes via their `describe` functions."""

from __future__ import annotations

import random
from typing import Any

from PIL import Image, ImageDraw

from phi4rv.data.synth import charts, geometry, tables, ui
from phi4rv.data.synth.common import COLORS, WHITE, Difficulty, Drawn

SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = {"white": WHITE, "light gray": (225, 225, 225), "cream": (250, 243, 224)}


def place(W: int, H: int, cell: int, size: str, rng: random.Random) -> list[int]:
    """A square box inside grid cell `cell` (3x3) of a W x H canvas."""
    cw, ch = W / 3, H / 3
    side = int(min(cw, ch) * (0.8 if size == "large" else 0.45))
    col, row = cell % 3, cell // 3
    x = int(col * cw + rng.randint(1, max(1, int(cw) - side - 1)))
    y = int(row * ch + rng.randint(1, max(1, int(ch) - side - 1)))
    return [x, y, x + side, y + side]


def shapes_scene(rng: random.Random, d: Difficulty, n: int | None = None) -> dict[str, Any]:
    W, H = d.pick(rng, "width"), d.pick(rng, "height")
    n = min(9, n if n is not None else d.pick(rng, "elements"))
    bg = rng.choice(list(BACKGROUNDS))
    colors = rng.sample(list(COLORS), n)
    shapes = []
    for cell, color in zip(sorted(rng.sample(range(9), n)), colors):
        size = rng.choice(("small", "large"))
        shapes.append({"kind": rng.choice(SHAPES), "color": color, "size": size, "cell": cell,
                       "box": place(W, H, cell, size, rng)})
    return {"type": "shapes", "width": W, "height": H, "background": bg, "shapes": shapes}


def draw_shapes(scene: dict[str, Any]) -> Image.Image:
    img = Image.new("RGB", (scene["width"], scene["height"]), BACKGROUNDS[scene["background"]])
    dr = ImageDraw.Draw(img)
    for s in scene["shapes"]:
        x1, y1, x2, y2 = s["box"]
        c = COLORS[s["color"]]
        if s["kind"] == "circle":
            dr.ellipse([x1, y1, x2 - 1, y2 - 1], fill=c)
        elif s["kind"] == "square":
            dr.rectangle([x1, y1, x2 - 1, y2 - 1], fill=c)
        else:
            dr.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=c)
    return img


def shape_phrase(s: dict[str, Any], with_size: bool = True) -> str:
    return f"{'a ' + s['size'] + ' ' if with_size else 'a '}{s['color']} {s['kind']}"


def where(cell: int) -> str:
    name = CELLS[cell]
    return "in the center" if name == "center" else f"at the {name}"


def describe_shapes(scene: dict[str, Any]) -> str:
    shapes = scene["shapes"]
    items = [f"{shape_phrase(s)} {where(s['cell'])}" for s in shapes]
    listing = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    noun = "shape" if len(shapes) == 1 else "shapes"
    return f"{len(shapes)} {noun} on a {scene['background']} background: {listing}."


def caption(rng: random.Random, d: Difficulty) -> Drawn:
    family = rng.choice(("shapes", "shapes", "chart", "table", "ui", "geometry"))
    if family == "shapes":
        scene = shapes_scene(rng, d)
        img, text = draw_shapes(scene), describe_shapes(scene)
        text = text[0].upper() + text[1:]
    elif family == "chart":
        scene = charts.make_scene(rng, d, ("bar", "line", "pie"))
        img, text = charts.draw(scene), charts.describe(scene)
    elif family == "table":
        scene = tables.table_scene(rng, d)
        img, text = tables.draw_table(scene), tables.describe(scene)
    elif family == "ui":
        scene = ui.make_scene(rng, d)
        img, text = ui.draw(scene), ui.describe(scene)
    else:
        scene = geometry.rectangle_scene(rng, d, rng.choice(geometry.UNITS))
        img, text = geometry.draw_figure(scene), geometry.describe(scene)
    q = rng.choice(("Describe this image in detail.", "Write a detailed caption for this image.",
                    "What does this image show? Describe it."))
    return Drawn([img], q, text, "text", {"family": family, **scene})
