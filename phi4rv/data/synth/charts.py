"""Bar, line and pie charts drawn with PIL from a scene, so every value is exact.

Pixel geometry lives in the scene (plot area, bar columns, point positions, pie centre) so a test
can re-measure the drawing. When a chart prints no value labels the answer must be read off the
axis, and the sample carries `meta["tolerance"]` (a quarter of a tick per value read).
"""

from __future__ import annotations

import math
import random
from typing import Any

from PIL import Image, ImageDraw

from phi4rv.data.synth.common import (
    COLORS,
    GRID,
    TEXT,
    WHITE,
    Difficulty,
    Drawn,
    fmt_num,
    font,
    text_size,
    words,
)

AXIS = (90, 90, 90)
MARKER = (0, 0, 0)  # line-chart points: pure black, a colour nothing else uses
TITLES = ("Sales by region", "Monthly visitors", "Scores", "Revenue", "Units sold", "Rainfall", "Votes", "Output")


def _nice_axis(vmax: float, ticks: int = 5) -> tuple[float, float]:
    """(axis max, tick step) with steps of 1, 2 or 5 times a power of ten."""
    raw = vmax / ticks
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return step * math.ceil(vmax / step), step


def _labels(rng: random.Random, n: int, fs: int, room: int) -> list[str]:
    pool = [w for w in words(rng, 40) if text_size(w, fs)[0] <= room]
    if len(pool) >= n:
        return pool[:n]
    return [chr(ord("A") + i) for i in range(n)]


def _values(rng: random.Random, n: int, vmax: int) -> list[int]:
    # distinct, so "which is larger" always has an answer; at least vmax/20 so every bar is visible
    pool = range(max(1, vmax // 20), max(vmax, n) + 1)
    return rng.sample(pool, n)


# ---- scenes and drawing ----------------------------------------------------------------------


def _axes_scene(rng: random.Random, d: Difficulty, kind: str, n: int) -> dict[str, Any]:
    W, H, fs = d.pick(rng, "width"), d.pick(rng, "height"), d.pick(rng, "font_size")
    values = _values(rng, n, d.max_value)
    y_max, step = _nice_axis(max(values))
    title = rng.choice(TITLES) if H >= 200 else ""
    show_values = rng.random() < d.value_labels
    tick_w = max(text_size(fmt_num(y_max), fs)[0], text_size("0", fs)[0])
    x0, x1 = tick_w + 8, W - 8
    y0 = 4 + (fs + 6 if title else 0) + (fs + 4 if show_values else 4)
    y1 = H - fs - 8
    slot = (x1 - x0) / n
    if kind == "bar":
        labels = _labels(rng, n, fs, int(slot) - 4)
    elif text_size("2000", fs)[0] <= slot - 4 or n > 4:
        first = rng.randint(2000, 2020)
        labels, period = [str(first + i) for i in range(n)], "year"
    else:  # narrow plots: quarters
        labels, period = [f"Q{i + 1}" for i in range(n)], "quarter"
    plot_h = y1 - y0
    heights = [round(v / y_max * plot_h) for v in values]
    scene: dict[str, Any] = {
        "type": kind, "title": title, "width": W, "height": H, "font_size": fs,
        "color": rng.choice(list(COLORS)), "labels": labels, "values": values,
        "y_max": y_max, "y_step": step, "plot": [x0, y0, x1, y1], "value_labels": show_values,
    }
    if kind == "bar":
        bw = max(2, round(slot * 0.6))
        lefts = [round(x0 + slot * i + (slot - bw) / 2) for i in range(n)]
        scene["bars"] = [[a, a + bw, y1 - h, y1] for a, h in zip(lefts, heights)]  # x1, x2, top, base (end-exclusive)
    else:
        scene["period"] = period
        scene["points"] = [[round(x0 + slot * (i + 0.5)), y1 - h] for i, h in enumerate(heights)]
        scene["marker"] = 2 if W < 300 else 3
    return scene


def _draw_axes(scene: dict[str, Any]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (scene["width"], scene["height"]), WHITE)
    draw = ImageDraw.Draw(img)
    fs, (x0, y0, x1, y1) = scene["font_size"], scene["plot"]
    f = font(fs)
    if scene["title"]:
        draw.text(((x0 + x1) // 2, 4), scene["title"], fill=TEXT, font=f, anchor="mt")
    y_max, step = scene["y_max"], scene["y_step"]
    k = 0
    while k * step <= y_max + 1e-9:
        y = y1 - round(k * step / y_max * (y1 - y0))
        if k:
            draw.line([(x0, y), (x1, y)], fill=GRID)
        draw.text((x0 - 4, y), fmt_num(k * step), fill=TEXT, font=f, anchor="rm")
        k += 1
    draw.line([(x0 - 1, y0), (x0 - 1, y1)], fill=AXIS)
    draw.line([(x0 - 1, y1), (x1, y1)], fill=AXIS)
    return img, draw


def draw_bar(scene: dict[str, Any]) -> Image.Image:
    img, draw = _draw_axes(scene)
    f, color = font(scene["font_size"]), COLORS[scene["color"]]
    y1 = scene["plot"][3]
    for (a, b, top, base), label, v in zip(scene["bars"], scene["labels"], scene["values"]):
        if base > top:
            draw.rectangle([a, top, b - 1, base - 1], fill=color)
        draw.text(((a + b) // 2, y1 + 4), label, fill=TEXT, font=f, anchor="mt")
        if scene["value_labels"]:
            draw.text(((a + b) // 2, top - 2), fmt_num(v), fill=TEXT, font=f, anchor="mb")
    return img


def draw_line(scene: dict[str, Any]) -> Image.Image:
    img, draw = _draw_axes(scene)
    f, color, r = font(scene["font_size"]), COLORS[scene["color"]], scene["marker"]
    y1 = scene["plot"][3]
    pts = [tuple(p) for p in scene["points"]]
    draw.line(pts, fill=color, width=2)
    for (x, y), label, v in zip(pts, scene["labels"], scene["values"]):
        draw.rectangle([x - r, y - r, x + r, y + r], fill=MARKER)
        draw.text((x, y1 + 4), label, fill=TEXT, font=f, anchor="mt")
        if scene["value_labels"]:
            draw.text((x, y - r - 2), fmt_num(v), fill=TEXT, font=f, anchor="mb")
    return img


def _pie_scene(rng: random.Random, d: Difficulty, n: int) -> dict[str, Any]:
    W, H, fs = d.pick(rng, "width"), d.pick(rng, "height"), d.pick(rng, "font_size")
    # integer percentages summing to 100, each a multiple of 4 (at least 4) so every slice is visible
    cuts = sorted(rng.sample(range(1, 25), n - 1))
    values = [4 * (b - a) for a, b in zip([0, *cuts], [*cuts, 25])]
    colors = rng.sample(list(COLORS), n)
    show_values = rng.random() < d.value_labels
    labels = words(rng, n, max_len=5)
    row = fs + 4
    legend_w = max(text_size(f"{w} (100%)", fs)[0] for w in labels) + fs + 2
    if W - legend_w - 16 >= 0.6 * H:  # legend to the right of the pie
        R = max(8, min((W - legend_w - 16) // 2, (H - 8) // 2))
        center, legend = [4 + R, H // 2], [12 + 2 * R, H // 2 - n * row // 2]
    else:  # legend under the pie
        R = max(8, min(W // 2 - 4, (H - n * row - 12) // 2))
        center, legend = [W // 2, 4 + R], [max(2, (W - legend_w) // 2), 10 + 2 * R]
    return {
        "type": "pie", "width": W, "height": H, "font_size": fs, "labels": labels, "values": values,
        "colors": colors, "center": center, "radius": R, "legend": legend, "value_labels": show_values,
        "title": "",
    }


def draw_pie(scene: dict[str, Any]) -> Image.Image:
    img = Image.new("RGB", (scene["width"], scene["height"]), WHITE)
    draw = ImageDraw.Draw(img)
    (cx, cy), R, fs = scene["center"], scene["radius"], scene["font_size"]
    start = -90.0
    for v, c in zip(scene["values"], scene["colors"]):
        end = start + 360.0 * v / 100
        draw.pieslice([cx - R, cy - R, cx + R, cy + R], start, end, fill=COLORS[c])
        start = end
    f, (x, y) = font(fs), scene["legend"]
    for label, v, c in zip(scene["labels"], scene["values"], scene["colors"]):
        draw.rectangle([x, y + 2, x + fs - 4, y + fs - 2], fill=COLORS[c])
        text = f"{label} ({v}%)" if scene["value_labels"] else label
        draw.text((x + fs + 2, y + fs // 2), text, fill=TEXT, font=f, anchor="lm")
        y += fs + 4
    return img


DRAW = {"bar": draw_bar, "line": draw_line, "pie": draw_pie}


def draw(scene: dict[str, Any]) -> Image.Image:
    return DRAW[scene["type"]](scene)


def make_scene(rng: random.Random, d: Difficulty, kinds: tuple[str, ...], min_n: int = 2) -> dict[str, Any]:
    kind = rng.choice(kinds)
    n = min(12, max(min_n, d.pick(rng, "elements")))  # more bars than 12 stop being readable
    if kind == "pie":
        return _pie_scene(rng, d, min(n, 6))
    return _axes_scene(rng, d, kind, n)


def _tolerance(scene: dict[str, Any], readings: int) -> dict[str, Any]:
    """Values read off an axis are good to about a quarter tick each; printed values are exact."""
    if scene["value_labels"] or scene["type"] == "pie":
        return {}
    return {"tolerance": {"abs": scene["y_step"] / 4 * readings}}


def _unit(scene: dict[str, Any]) -> str:
    return "%" if scene["type"] == "pie" else ""


def _reading(scene: dict[str, Any], idx: list[int] | None = None) -> str:
    idx = list(range(len(scene["values"]))) if idx is None else idx
    labelled = scene["value_labels"] or scene["type"] == "pie"
    how = "The chart labels its values" if labelled else "Reading the bars against the axis"
    if scene["type"] == "line":
        how = "The chart labels its points" if scene["value_labels"] else "Reading the points against the axis"
    vals = ", ".join(f"{scene['labels'][i]} = {fmt_num(scene['values'][i])}{_unit(scene)}" for i in idx)
    return f"{how}: {vals}."


def _what(scene: dict[str, Any], label: str) -> str:
    if scene["type"] == "line":
        return f"the value in {label}"
    if scene["type"] == "pie":
        return f"the share of {label}"
    return f"the value of {label}"


# ---- tasks -----------------------------------------------------------------------------------


def chart_value(rng: random.Random, d: Difficulty) -> Drawn:
    scene = make_scene(rng, d, ("bar", "line", "pie"))
    i = rng.randrange(len(scene["values"]))
    label, v = scene["labels"][i], scene["values"][i]
    if scene["type"] == "pie":
        q = f"What percentage of the total is {label}? Answer with a number."
    elif scene["type"] == "line":
        q = f"What was the value in {label}? Answer with a number."
    else:
        q = f"What is the value of {label}? Answer with a number."
    return Drawn([draw(scene)], q, fmt_num(v), "number", scene, extra=_tolerance(scene, 1))


def chart_compare(rng: random.Random, d: Difficulty) -> Drawn:
    scene = make_scene(rng, d, ("bar", "line", "pie"))
    vals, labels = scene["values"], scene["labels"]
    i, j = rng.sample(range(len(vals)), 2)
    if vals[i] < vals[j]:
        i, j = j, i
    a, b, u = labels[i], labels[j], _unit(scene)
    variant = rng.choice(("diff", "larger", "max", "min"))
    if variant == "diff":
        q = f"How much greater is {_what(scene, a)} than {_what(scene, b)}? Answer with a number."
        diff = vals[i] - vals[j]
        trace = (f"{_reading(scene, [i, j])}\n{a} is {fmt_num(vals[i])}{u} and {b} is {fmt_num(vals[j])}{u}.\n"
                 f"The difference is {fmt_num(vals[i])} - {fmt_num(vals[j])} = {fmt_num(diff)}.")
        return Drawn([draw(scene)], q, fmt_num(diff), "number", scene, trace, extra=_tolerance(scene, 2))
    if variant == "larger":
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        q = f"Which is larger: {_what(scene, first)} or {_what(scene, second)}? Answer with the label."
        trace = (f"{_reading(scene, [i, j])}\n{fmt_num(vals[i])} > {fmt_num(vals[j])}, so {a} is larger.")
        return Drawn([draw(scene)], q, a, "text", scene, trace)
    best = max if variant == "max" else min
    k = vals.index(best(vals))
    word = "highest" if variant == "max" else "lowest"
    thing = scene["period"] if scene["type"] == "line" else "category"
    q = f"Which {thing} has the {word} value? Answer with the label."
    trace = (f"{_reading(scene)}\nComparing all {len(vals)} values, the {word} is {fmt_num(vals[k])}{u}, "
             f"which belongs to {labels[k]}.")
    return Drawn([draw(scene)], q, labels[k], "text", scene, trace)


def chart_sum(rng: random.Random, d: Difficulty) -> Drawn:
    scene = make_scene(rng, d, ("bar", "line", "pie"))
    vals, labels, u = scene["values"], scene["labels"], _unit(scene)
    n = len(vals)
    if scene["type"] == "pie":
        idx = sorted(rng.sample(range(n), rng.randint(2, max(2, n - 1))))
        named = f"{', '.join(labels[i] for i in idx[:-1])} and {labels[idx[-1]]}"
        q = f"What is the combined percentage of {named}? Answer with a number."
    elif rng.random() < 0.5:
        idx = list(range(n))
        q = "What is the sum of all the values in the chart? Answer with a number."
    else:
        idx = sorted(rng.sample(range(n), 2))
        q = f"What is the total of {_what(scene, labels[idx[0]])} and {_what(scene, labels[idx[1]])}? Answer with a number."
    total = sum(vals[i] for i in idx)
    steps = " + ".join(fmt_num(vals[i]) for i in idx)
    trace = f"{_reading(scene, idx)}\nAdding them: {steps} = {fmt_num(total)}{u}."
    return Drawn([draw(scene)], q, fmt_num(total), "number", scene, trace, extra=_tolerance(scene, len(idx)))


def chart_trend(rng: random.Random, d: Difficulty) -> Drawn:
    for _ in range(100):  # redraw until the largest increase is unique
        scene = make_scene(rng, d, ("line",), min_n=3)
        vals = scene["values"]
        deltas = [b - a for a, b in zip(vals, vals[1:])]
        if max(deltas) > 0 and deltas.count(max(deltas)) == 1:
            break
    labels = scene["labels"]
    if rng.random() < 0.5:
        k = deltas.index(max(deltas)) + 1
        p = scene["period"]
        q = f"In which {p} did the value rise the most compared with the {p} before? Answer with the {p}."
        lines = [f"{labels[i]} to {labels[i + 1]}: {fmt_num(vals[i + 1])} - {fmt_num(vals[i])} = {fmt_num(dl)}"
                 for i, dl in enumerate(deltas)]
        trace = (f"{_reading(scene)}\nChanges from one {p} to the next:\n" + "\n".join(lines)
                 + f"\nThe largest rise is {fmt_num(max(deltas))}, into {labels[k]}.")
        return Drawn([draw(scene)], q, labels[k], "text", scene, trace)
    change = vals[-1] - vals[0]
    q = f"By how much did the value change from {labels[0]} to {labels[-1]}? Answer with a number (negative for a fall)."
    trace = (f"{_reading(scene, [0, len(vals) - 1])}\n"
             f"The change is {fmt_num(vals[-1])} - {fmt_num(vals[0])} = {fmt_num(change)}.")
    return Drawn([draw(scene)], q, fmt_num(change), "number", scene, trace, extra=_tolerance(scene, 2))


def describe(scene: dict[str, Any]) -> str:
    """A caption written from the scene."""
    n, labels, vals, u = len(scene["values"]), scene["labels"], scene["values"], _unit(scene)
    pairs = ", ".join(f"{lab} {fmt_num(v)}{u}" for lab, v in zip(labels, vals))
    hi = labels[vals.index(max(vals))]
    title = f" titled \"{scene['title']}\"" if scene.get("title") else ""
    if scene["type"] == "pie":
        cols = ", ".join(f"{lab} in {c}" for lab, c in zip(labels, scene["colors"]))
        return f"A pie chart with {n} slices ({cols}) and a legend on the right. The shares are {pairs}; {hi} is the largest."
    what = "bar chart" if scene["type"] == "bar" else "line chart"
    items = "bars" if scene["type"] == "bar" else "points"
    return (f"A {what}{title} with {n} {scene['color']} {items} on an axis from 0 to {fmt_num(scene['y_max'])}. "
            f"The values are {pairs}; {hi} is the highest.")
