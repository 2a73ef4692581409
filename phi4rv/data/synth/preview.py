"""A contact sheet: sample images with their questions and answers, for a person to look at."""

from __future__ import annotations

import io
import textwrap

from PIL import Image, ImageDraw

from phi4rv.data.formats import Sample, load_image_bytes
from phi4rv.data.synth.common import font

CELL_W, IMG_H, TEXT_LINES, FS = 360, 220, 9, 11


def _thumbs(sample: Sample) -> Image.Image:
    ims = []
    for ref in sample.images:
        try:
            ims.append(Image.open(io.BytesIO(load_image_bytes(ref))).convert("RGB"))
        except Exception:  # a broken image still gets its cell
            ims.append(Image.new("RGB", (64, 64), (255, 0, 255)))
    box = Image.new("RGB", (CELL_W, IMG_H), (235, 235, 235))
    if not ims:
        return box
    w = (CELL_W - 4 * (len(ims) - 1)) // len(ims)
    x = 0
    for im in ims:
        im.thumbnail((w, IMG_H))
        box.paste(im, (x + (w - im.width) // 2, (IMG_H - im.height) // 2))
        x += w + 4
    return box


def _text(sample: Sample) -> list[str]:
    user = next((m["content"] for m in sample.messages if m["role"] == "user"), "").replace("<image>\n", "")
    answer = next((m["content"] for m in reversed(sample.messages) if m["role"] == "assistant"), "")
    task = sample.meta.get("task", "?")
    lines = [f"[{task}] {sample.id}"]
    lines += textwrap.wrap("Q: " + " ".join(user.split()), 62)[:4]
    lines += textwrap.wrap("A: " + " ".join(answer.split()), 62)
    if len(lines) > TEXT_LINES:
        lines = lines[: TEXT_LINES - 1] + ["... " + lines[-1][-56:]]  # keep the end: the final answer
    return lines


def contact_sheet(samples: list[Sample], columns: int = 4) -> Image.Image:
    rows = (len(samples) + columns - 1) // columns
    cell_h = IMG_H + TEXT_LINES * (FS + 3) + 10
    sheet = Image.new("RGB", (columns * (CELL_W + 8) + 8, rows * (cell_h + 8) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    f = font(FS)
    for i, s in enumerate(samples):
        x, y = 8 + (i % columns) * (CELL_W + 8), 8 + (i // columns) * (cell_h + 8)
        sheet.paste(_thumbs(s), (x, y))
        for k, line in enumerate(_text(s)):
            draw.text((x, y + IMG_H + 4 + k * (FS + 3)), line, fill=(20, 20, 20), font=f)
    return sheet
