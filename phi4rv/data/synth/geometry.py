"""Geometry figures drawn to scale with labelled lengths and angles, and rendered arithmetic.

Figures keep their vertices in pixels in the scene; the labelled lengths are in "units" and the
drawing uses one scale factor, so ratios measured on the image match the labels.
"""

from __future__ import annotations

import math
import random
from typing import Any

from PIL import Image, ImageDraw

from phi4rv.data.synth.common import TEXT, WHITE, Difficulty, Drawn, fmt_num, font, text_size

OUTLINE = (30, 60, 160)  # figure edges: a colour nothing else uses
UNITS = ("cm", "m", "in")
TRIPLES = ((3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (6, 8, 10), (9, 12, 15), (20, 21, 29))


def _canvas(rng: random.Random, d: Difficulty) -> tuple[int, int, int]:
    return d.pick(rng, "width"), d.pick(rng, "height"), d.pick(rng, "font_size")


def _fit(points: list[tuple[float, float]], W: int, H: int, margin: int) -> tuple[list[list[int]], float]:
    """Scale and centre unit-space points into the canvas; returns pixel points and the scale."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    w, h = max(xs) - min(xs), max(ys) - min(ys)
    s = min((W - 2 * margin) / w, (H - 2 * margin) / h)
    ox = (W - s * w) / 2 - s * min(xs)
    oy = (H - s * h) / 2 - s * min(ys)
    return [[round(ox + s * x), round(oy + s * y)] for x, y in points], s


def _label_out(p: list[int], q: list[int], centre: tuple[float, float], text: str, fs: int, gap: int) -> dict[str, Any]:
    """A label beside edge p-q, pushed away from the figure's centre."""
    mx, my = (p[0] + q[0]) / 2, (p[1] + q[1]) / 2
    dx, dy = mx - centre[0], my - centre[1]
    n = math.hypot(dx, dy) or 1
    tw, th = text_size(text, fs)
    off = gap + max(tw, th) / 2 * (abs(dx) / n) + th / 2 * (abs(dy) / n)
    return {"text": text, "xy": [round(mx + dx / n * off), round(my + dy / n * off)], "anchor": "mm"}


def draw_figure(scene: dict[str, Any]) -> Image.Image:
    img = Image.new("RGB", (scene["width"], scene["height"]), WHITE)
    draw = ImageDraw.Draw(img)
    f = font(scene["font_size"])
    if scene["shape"] == "circle":
        (cx, cy), r = scene["center"], scene["radius_px"]
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=OUTLINE, width=2)
        draw.line([(cx, cy), (cx + r, cy)], fill=OUTLINE, width=2)
        draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=OUTLINE)
    else:
        pts = [tuple(p) for p in scene["vertices"]]
        draw.line([*pts, pts[0]], fill=OUTLINE, width=2, joint="curve")
        for mark in scene.get("marks", []):  # right-angle squares, height lines
            draw.line([tuple(p) for p in mark], fill=OUTLINE, width=1)
    for t in scene["labels"]:
        draw.text(tuple(t["xy"]), t["text"], fill=TEXT, font=f, anchor=t["anchor"])
    return img


def _right_mark(v: list[int], a: list[int], b: list[int], size: int) -> list[list[int]]:
    """The little square at vertex v between edges v-a and v-b."""
    def unit(p: list[int]) -> tuple[float, float]:
        dx, dy = p[0] - v[0], p[1] - v[1]
        n = math.hypot(dx, dy)
        return dx / n, dy / n

    (ax, ay), (bx, by) = unit(a), unit(b)
    p1 = [round(v[0] + ax * size), round(v[1] + ay * size)]
    p3 = [round(v[0] + bx * size), round(v[1] + by * size)]
    p2 = [round(v[0] + (ax + bx) * size), round(v[1] + (ay + by) * size)]
    return [p1, p2, p3]


def _polygon_scene(rng: random.Random, d: Difficulty, shape: str, units_pts: list[tuple[float, float]],
                   edge_labels: dict[int, str], extra: dict[str, Any]) -> dict[str, Any]:
    W, H, fs = _canvas(rng, d)
    margin = max(text_size("00 cm", fs)[0] // 2 + fs + 6, 12)
    verts, scale = _fit(units_pts, W, H, margin)
    centre = (sum(p[0] for p in verts) / len(verts), sum(p[1] for p in verts) / len(verts))
    labels = [_label_out(verts[i], verts[(i + 1) % len(verts)], centre, text, fs, 4) for i, text in edge_labels.items()]
    return {"shape": shape, "width": W, "height": H, "font_size": fs, "vertices": verts, "scale": scale,
            "labels": labels, **extra}


def rectangle_scene(rng: random.Random, d: Difficulty, unit: str) -> dict[str, Any]:
    hi = 12 if d.max_value <= 20 else 30
    w, h = rng.randint(2, hi), rng.randint(2, hi)
    while max(w, h) / min(w, h) > 4:
        w, h = rng.randint(2, hi), rng.randint(2, hi)
    pts = [(0, 0), (w, 0), (w, h), (0, h)]
    return _polygon_scene(rng, d, "rectangle", pts, {0: f"{w} {unit}", 1: f"{h} {unit}"},
                          {"sides": {"width": w, "height": h}, "unit": unit})


def _right_triangle(rng: random.Random, d: Difficulty, unit: str, label_hyp: bool) -> dict[str, Any]:
    t = rng.choice(TRIPLES[:3] if d.max_value <= 20 else TRIPLES)
    k = 1 if d.max_value <= 20 else rng.randint(1, 2)
    a, b, c = (k * x for x in t)
    if rng.random() < 0.5:
        a, b = b, a
    pts = [(0, 0), (0, b), (a, b)]  # right angle at the bottom-left vertex
    labels = {0: f"{b} {unit}", 1: f"{a} {unit}"}
    if label_hyp:
        labels[2] = f"{c} {unit}"
    sides = {"base": a, "height": b, "hypotenuse": c}
    scene = _polygon_scene(rng, d, "right_triangle", pts, labels, {"sides": sides, "unit": unit})
    v = scene["vertices"]
    scene["marks"] = [_right_mark(v[1], v[0], v[2], max(6, scene["font_size"]))]
    return scene


def _trapezoid(rng: random.Random, d: Difficulty, unit: str) -> dict[str, Any]:
    hi = 12 if d.max_value <= 20 else 24
    b = rng.randint(4, hi)
    a = rng.randint(2, b - 1)
    h = rng.randint(2, hi)
    off = (b - a) / 2
    pts = [(off, 0), (off + a, 0), (b, h), (0, h)]
    scene = _polygon_scene(rng, d, "trapezoid", pts, {0: f"{a} {unit}", 2: f"{b} {unit}"},
                           {"sides": {"top": a, "bottom": b, "height": h}, "unit": unit})
    # the height: a thin line from the top-left vertex straight down, labelled beside it
    v = scene["vertices"]
    foot = [v[0][0], v[3][1]]
    scene["marks"] = [[v[0], foot]]
    scene["labels"].append({"text": f"{h} {unit}", "xy": [v[0][0] + 4, (v[0][1] + foot[1]) // 2], "anchor": "lm"})
    return scene


def _circle(rng: random.Random, d: Difficulty, unit: str) -> dict[str, Any]:
    W, H, fs = _canvas(rng, d)
    r = rng.randint(1, 10 if d.max_value <= 20 else 20)
    R = max(10, min(W, H) // 2 - 6)
    cx, cy = W // 2, H // 2
    label = {"text": f"r = {r} {unit}", "xy": [cx + R // 2, cy - 4], "anchor": "mb"}
    return {"shape": "circle", "width": W, "height": H, "font_size": fs, "center": [cx, cy], "radius_px": R,
            "radius": r, "scale": R / r, "labels": [label], "unit": unit}


def geometry_area(rng: random.Random, d: Difficulty) -> Drawn:
    unit = rng.choice(UNITS)
    shape = rng.choice(("rectangle", "right_triangle", "circle", "trapezoid"))
    if shape == "rectangle":
        scene = rectangle_scene(rng, d, unit)
        w, h = scene["sides"]["width"], scene["sides"]["height"]
        area = w * h
        trace = f"The rectangle is {w} {unit} wide and {h} {unit} tall.\nArea = width x height = {w} x {h} = {area}."
    elif shape == "right_triangle":
        scene = _right_triangle(rng, d, unit, label_hyp=False)
        a, b = scene["sides"]["base"], scene["sides"]["height"]
        area = a * b / 2
        trace = (f"The triangle has a right angle, with legs {a} {unit} and {b} {unit}.\n"
                 f"Area = 1/2 x base x height = 1/2 x {a} x {b} = {fmt_num(area)}.")
    elif shape == "trapezoid":
        scene = _trapezoid(rng, d, unit)
        a, b, h = (scene["sides"][k] for k in ("top", "bottom", "height"))
        area = (a + b) * h / 2
        trace = (f"The trapezoid has parallel sides {a} {unit} and {b} {unit} and height {h} {unit}.\n"
                 f"Area = (a + b) / 2 x h = ({a} + {b}) / 2 x {h} = {fmt_num(area)}.")
    else:
        scene = _circle(rng, d, unit)
        r = scene["radius"]
        area = round(3.14 * r * r, 2)
        trace = f"The radius is {r} {unit}.\nArea = pi x r^2 = 3.14 x {r} x {r} = {fmt_num(area)}."
    q = f"What is the area of the {shape.replace('_', ' ')} in square {unit}?"
    if shape == "circle":
        q += " Use 3.14 for pi."
    q += " Answer with a number."
    return Drawn([draw_figure(scene)], q, fmt_num(area), "number", scene, trace + f"\nThe area is {fmt_num(area)} square {unit}.")


def geometry_length(rng: random.Random, d: Difficulty) -> Drawn:
    unit = rng.choice(UNITS)
    if rng.random() < 0.5:
        scene = _right_triangle(rng, d, unit, label_hyp=False)
        a, b, c = (scene["sides"][k] for k in ("base", "height", "hypotenuse"))
        q = f"How long is the longest side of the right triangle, in {unit}? Answer with a number."
        trace = (f"The legs are {a} {unit} and {b} {unit}, with a right angle between them.\n"
                 f"By Pythagoras, c^2 = {a}^2 + {b}^2 = {a * a} + {b * b} = {c * c}.\nc = sqrt({c * c}) = {c}.")
        ans = c
    else:
        scene = rectangle_scene(rng, d, unit)
        w, h = scene["sides"]["width"], scene["sides"]["height"]
        ans = 2 * (w + h)
        q = f"What is the perimeter of the rectangle, in {unit}? Answer with a number."
        trace = f"The rectangle is {w} {unit} by {h} {unit}.\nPerimeter = 2 x ({w} + {h}) = 2 x {w + h} = {ans}."
    return Drawn([draw_figure(scene)], q, str(ans), "number", scene, trace)


def geometry_angle(rng: random.Random, d: Difficulty) -> Drawn:
    W, H, fs = _canvas(rng, d)
    A = rng.randint(30, 80)
    B = rng.randint(30, min(110, 150 - A))
    C = 180 - A - B
    # base from (0, 0) to (1, 0) in unit space, apex above; y grows downwards on screen
    ta, tb = math.tan(math.radians(A)), math.tan(math.radians(B))
    x = tb / (ta + tb)
    y = x * ta
    pts = [(0.0, y), (1.0, y), (x, 0.0)]
    margin = fs + 8
    verts, scale = _fit(pts, W, H, margin)
    centre = (sum(p[0] for p in verts) / 3, sum(p[1] for p in verts) / 3)

    def inside(v: list[int], text: str) -> dict[str, Any]:
        dx, dy = centre[0] - v[0], centre[1] - v[1]
        n = math.hypot(dx, dy) or 1
        step = min(n * 0.6, 2.2 * fs)
        return {"text": text, "xy": [round(v[0] + dx / n * step), round(v[1] + dy / n * step)], "anchor": "mm"}

    labels = [inside(verts[0], f"{A}°"), inside(verts[1], f"{B}°"), inside(verts[2], "?")]
    scene = {"shape": "triangle", "width": W, "height": H, "font_size": fs, "vertices": verts, "scale": scale,
             "angles": [A, B, C], "labels": labels}
    q = "Two angles of the triangle are marked. What is the angle marked '?', in degrees? Answer with a number."
    trace = f"The marked angles are {A} and {B} degrees.\nThe angles of a triangle add up to 180.\n180 - {A} - {B} = {C}."
    return Drawn([draw_figure(scene)], q, str(C), "number", scene, trace)


# ---- rendered arithmetic ---------------------------------------------------------------------


def _expression(rng: random.Random, d: Difficulty) -> list[str]:
    hi = 9 if d.max_value <= 20 else 20
    n_ops = 1 if d.max_value <= 20 else rng.randint(2, 3)
    tokens = [str(rng.randint(1, hi))]
    for _ in range(n_ops):
        tokens += [rng.choice(("+", "-", "*")), str(rng.randint(1, hi))]
    if n_ops >= 2 and rng.random() < 0.5:  # parenthesise one operation
        i = rng.randrange(0, n_ops) * 2
        tokens = tokens[:i] + ["("] + tokens[i : i + 3] + [")"] + tokens[i + 3 :]
    return tokens


def _steps(tokens: list[str]) -> tuple[int, list[str]]:
    """Evaluate with the usual precedence, writing one line per reduction."""
    toks = list(tokens)
    lines = []

    def show(ts: list[str]) -> str:
        return " ".join("x" if t == "*" else t for t in ts).replace("( ", "(").replace(" )", ")")

    while len(toks) > 1:
        if "(" in toks:
            i = toks.index("(")
            j = toks.index(")")
            inner, _ = _reduce_flat(toks[i + 1 : j])
            toks = toks[:i] + [inner] + toks[j + 1 :]
        else:
            _, toks = _reduce_flat(toks, one=True)
        lines.append("= " + show(toks))
    return int(toks[0]), [show(tokens), *lines]


def _reduce_flat(toks: list[str], one: bool = False) -> tuple[str, list[str]]:
    toks = list(toks)
    while len(toks) > 1:
        i = toks.index("*") if "*" in toks else 1
        a, op, b = int(toks[i - 1]), toks[i], int(toks[i + 1])
        v = a * b if op == "*" else a + b if op == "+" else a - b
        toks = toks[: i - 1] + [str(v)] + toks[i + 2 :]
        if one:
            return toks[0], toks
    return toks[0], toks


def _draw_expression(scene: dict[str, Any]) -> Image.Image:
    img = Image.new("RGB", (scene["width"], scene["height"]), WHITE)
    draw = ImageDraw.Draw(img)
    fs = scene["font_size"]
    f = font(fs)
    x, y = scene["xy"]
    for t in scene["tokens"]:
        if t == "*":  # the font has no multiplication sign: draw one
            s = max(3, fs // 4)
            cx, cy = x + s + 2, y
            draw.line([(cx - s, cy - s), (cx + s, cy + s)], fill=TEXT, width=max(1, fs // 10))
            draw.line([(cx - s, cy + s), (cx + s, cy - s)], fill=TEXT, width=max(1, fs // 10))
            x += 2 * s + 4 + fs // 4
        else:
            draw.text((x, y), t, fill=TEXT, font=f, anchor="lm")
            x += text_size(t, fs)[0] + fs // 4
    return img


def _token_width(t: str, fs: int) -> int:
    if t == "*":
        return 2 * max(3, fs // 4) + 4 + fs // 4
    return text_size(t, fs)[0] + fs // 4


def math_expr(rng: random.Random, d: Difficulty) -> Drawn:
    W, H, fs = _canvas(rng, d)
    tokens = _expression(rng, d)
    fs = max(fs, 14) if W < 300 else 2 * fs
    tokens_shown = [*tokens, "=", "?"]
    while sum(_token_width(t, fs) for t in tokens_shown) > W - 8 and fs > 8:
        fs -= 1
    width = sum(_token_width(t, fs) for t in tokens_shown)
    scene = {"shape": "expression", "width": W, "height": H, "font_size": fs, "tokens": tokens_shown,
             "xy": [max(4, (W - width) // 2), H // 2]}
    value, lines = _steps(tokens)
    q = "What is the value of the expression in the image? Answer with a number."
    rule = ""
    if "(" in tokens:
        rule = "Brackets first, then multiplication, then addition and subtraction from left to right.\n"
    elif "*" in tokens and len(tokens) > 3:
        rule = "Multiplication comes before addition and subtraction.\n"
    trace = f"The image shows {lines[0]}.\n{rule}" + "\n".join(lines[1:])
    return Drawn([_draw_expression(scene)], q, str(value), "number", scene, trace)


def describe(scene: dict[str, Any]) -> str:
    shape = scene["shape"]
    if shape == "expression":
        return "An arithmetic expression: " + " ".join("x" if t == "*" else t for t in scene["tokens"]) + "."
    if shape == "triangle":
        a, b, _ = scene["angles"]
        return f"A triangle with two angles marked {a}° and {b}°; the third is marked with a question mark."
    labels = ", ".join(t["text"] for t in scene["labels"])
    return f"A {shape.replace('_', ' ')} drawn in blue outline with the measurements {labels}."
