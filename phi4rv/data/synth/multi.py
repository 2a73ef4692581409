"""Multi-image sets: what changed between two images, scrambled frames to put in order, and
captions to match to images."""

from __future__ import annotations

import copy
import random
from typing import Any

from PIL import Image, ImageDraw

from phi4rv.data.synth.captions import (
    CELLS,
    SHAPES,
    describe_shapes,
    draw_shapes,
    place,
    shape_phrase,
    shapes_scene,
    where,
)
from phi4rv.data.synth.common import COLORS, WHITE, Difficulty, Drawn, choice_letters, fmt_choices

BAR_OUTLINE = (60, 60, 60)
BAR_FILL = (40, 150, 90)


def _the(s: dict[str, Any]) -> str:
    return f"the {s['color']} {s['kind']}"


def _change(rng: random.Random, scene: dict[str, Any], kind: str) -> tuple[dict[str, Any], str, set[int]]:
    """Apply one change of `kind` to a copy of `scene`; return the new scene, its description and
    the grid cells it touched."""
    after = copy.deepcopy(scene)
    shapes = after["shapes"]
    W, H = scene["width"], scene["height"]
    free = [c for c in range(9) if c not in {s["cell"] for s in shapes}]
    used_colors = {s["color"] for s in shapes}
    if kind == "removed":
        s = shapes.pop(rng.randrange(len(shapes)))
        return after, f"{_the(s).capitalize()} was removed", {s["cell"]}
    if kind == "added":
        cell = rng.choice(free)
        s = {"kind": rng.choice(SHAPES), "color": rng.choice([c for c in COLORS if c not in used_colors]),
             "size": rng.choice(("small", "large")), "cell": cell}
        s["box"] = place(W, H, cell, s["size"], rng)
        shapes.append(s)
        shapes.sort(key=lambda s: s["cell"])
        return after, f"{shape_phrase(s, False).capitalize()} was added {where(cell)}", {cell}
    if kind == "recolored":
        s = rng.choice(shapes)
        old = _the(s)
        s["color"] = rng.choice([c for c in COLORS if c not in used_colors])
        return after, f"{old.capitalize()} turned {s['color']}", {s["cell"]}
    s = rng.choice(shapes)  # moved
    old_cell, s["cell"] = s["cell"], rng.choice(free)
    s["box"] = place(W, H, s["cell"], s["size"], rng)
    shapes.sort(key=lambda s: s["cell"])
    return after, f"{_the(s).capitalize()} moved to the {CELLS[s['cell']]}", {old_cell, s["cell"]}


def multi_diff(rng: random.Random, d: Difficulty) -> Drawn:
    n = max(2, min(8, d.pick(rng, "elements")))
    before = shapes_scene(rng, d, n)
    kinds = ["removed", "added", "recolored", "moved"]
    kind = rng.choice(kinds)
    after, truth, touched = _change(rng, before, kind)
    # distractors: other changes that could have happened to the first image, in other places
    options = [truth]
    for _ in range(100):
        if len(options) == 4:
            break
        _, text, cells = _change(random.Random(rng.getrandbits(64)), before, rng.choice(kinds))
        if text not in options and not cells & touched:
            options.append(text)
    rng.shuffle(options)
    letter = choice_letters(len(options))[options.index(truth)]
    q = f"What changed between the first and the second image?\n{fmt_choices(options)}\nAnswer with the letter."
    scene = {"type": "diff", "before": before, "after": after, "change": kind, "description": truth}
    return Drawn([draw_shapes(before), draw_shapes(after)], q, letter, "choice", scene, choices=options)


def _progress(W: int, H: int, p: int) -> tuple[Image.Image, list[int]]:
    img = Image.new("RGB", (W, H), WHITE)
    dr = ImageDraw.Draw(img)
    x1, x2 = W // 10, W - W // 10
    y1, y2 = H // 2 - max(6, H // 10), H // 2 + max(6, H // 10)
    dr.rectangle([x1, y1, x2 - 1, y2 - 1], outline=BAR_OUTLINE, width=2)
    fill = round((x2 - x1 - 4) * p / 100)
    if fill:
        dr.rectangle([x1 + 2, y1 + 2, x1 + 2 + fill - 1, y2 - 3], fill=BAR_FILL)
    return img, [x1, y1, x2, y2]


def multi_order(rng: random.Random, d: Difficulty) -> Drawn:
    n = max(3, min(5, d.pick(rng, "elements")))
    W, H = d.pick(rng, "width"), d.pick(rng, "height")
    if rng.random() < 0.5:
        # a progress bar filling up
        levels = sorted(rng.sample(range(5, 100, 5), n))
        frames = [{"progress": p} for p in levels]
        state = lambda f: f"the bar {f['progress']}% full"  # noqa: E731
        what = "a progress bar filling up"
    else:
        # a pile of shapes growing by one each frame
        base = shapes_scene(rng, d, 1)
        frames = [copy.deepcopy(base)]
        for _ in range(n - 1):
            nxt, _, _ = _change(rng, frames[-1], "added")
            frames.append(nxt)
        state = lambda f: f"{len(f['shapes'])} shape{'s' if len(f['shapes']) > 1 else ''}"  # noqa: E731
        what = "shapes being added one at a time"
    perm = list(range(n))
    while perm == sorted(perm):
        rng.shuffle(perm)  # perm[k] = the time step shown by image k+1
    shown = [frames[t] for t in perm]
    images = []
    for f in shown:
        if "progress" in f:
            img, box = _progress(W, H, f["progress"])
            f["bar"] = box
            images.append(img)
        else:
            images.append(draw_shapes(f))
    order = sorted(range(n), key=lambda k: perm[k])  # image indices in time order
    answer = ", ".join(str(k + 1) for k in order)
    q = (f"These {n} images are frames of {what}, in scrambled order. List the image numbers in the order "
         f"the frames happened, separated by commas.")
    lines = [f"Image {k + 1} shows {state(f)}." for k, f in enumerate(shown)]
    trace = "\n".join(lines) + "\nFrom the earliest to the latest: " + ", ".join(
        f"image {k + 1} ({state(shown[k])})" for k in order) + "."
    scene = {"type": "order", "what": what, "frames": shown, "time_steps": perm, "width": W, "height": H}
    return Drawn(images, q, answer, "order", scene, trace)


def multi_match(rng: random.Random, d: Difficulty) -> Drawn:
    n = max(2, min(4, d.pick(rng, "elements")))
    scenes, texts = [], []
    while len(scenes) < n:
        s = shapes_scene(rng, d, rng.randint(1, 2))
        text = describe_shapes(s)
        if text not in texts and all(_signature(s) != _signature(o) for o in scenes):
            scenes.append(s)
            texts.append(text)
    perm = list(range(n))
    rng.shuffle(perm)  # caption letter k describes image perm[k]
    captions = [texts[perm[k]] for k in range(n)]
    letters = choice_letters(n)
    answer = ", ".join(letters[perm.index(i)] for i in range(n))
    q = (f"Match each image to its caption.\n{fmt_choices(captions)}\nAnswer with the caption letters for "
         f"image 1 to image {n} in order, separated by commas.")
    scene = {"type": "match", "scenes": scenes, "captions": captions}
    return Drawn([draw_shapes(s) for s in scenes], q, answer, "order", scene, choices=captions)


def _signature(scene: dict[str, Any]) -> tuple:
    """What a caption can tell apart: the shapes' colours and kinds."""
    return tuple(sorted((s["color"], s["kind"]) for s in scene["shapes"]))
