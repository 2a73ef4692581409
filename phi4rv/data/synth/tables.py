"""Tables and receipts drawn with PIL. Every piece of text is listed in `scene["texts"]` with the
pixel box it was drawn in, so a test can check the image against the scene cell by cell."""

from __future__ import annotations

import random
from typing import Any

from PIL import Image, ImageDraw

from phi4rv.data.synth.common import (
    TEXT,
    WHITE,
    Difficulty,
    Drawn,
    fmt_money,
    fmt_num,
    font,
    text_box,
    text_size,
    words,
)

HEADER_BG = (225, 228, 235)
STRIPE_BG = (244, 245, 248)
LINE = (150, 150, 150)
NAME_HEADERS = ("Name", "Item", "City", "Team", "Product")
VALUE_HEADERS = ("Price", "Qty", "Score", "Age", "Sales", "Stock", "Points", "Weight", "Rank", "Cost")
STORES = ("Corner Shop", "Fresh Mart", "City Deli", "Green Grocer", "Book Nook", "Daily Cafe")
ITEMS = ("Milk", "Bread", "Eggs", "Tea", "Rice", "Soap", "Jam", "Salt", "Pasta", "Juice", "Beans", "Flour", "Honey")


# ---- tables ----------------------------------------------------------------------------------


def table_scene(rng: random.Random, d: Difficulty) -> dict[str, Any]:
    W, H, fs = d.pick(rng, "width"), d.pick(rng, "height"), d.pick(rng, "font_size")
    pad, row_h = 4, fs + 8
    n_rows = max(2, d.pick(rng, "elements"))
    n_vals = 1 if W < 240 else rng.randint(2, 4)
    decimals = rng.random() < d.decimals
    names = words(rng, min(n_rows, 20), max_len=6)
    headers = [rng.choice(NAME_HEADERS), *rng.sample(VALUE_HEADERS, n_vals)]
    cols = [[rng.randint(1, d.max_value * 100) / 100 if decimals else rng.randint(1, d.max_value) for _ in names]
            for _ in range(n_vals)]
    rows = [[name, *(fmt_num(c[i]) for c in cols)] for i, name in enumerate(names)]
    # drop value columns, then rows, until the table fits the image
    while True:
        widths = [max(text_size(t, fs)[0] for t in [h, *(r[j] for r in rows)]) + 2 * pad for j, h in enumerate(headers)]
        if (sum(widths) + 8 <= W and (len(rows) + 1) * row_h + 8 <= H) or (len(headers) == 2 and len(rows) == 2):
            break
        if sum(widths) + 8 > W and len(headers) > 2:
            headers, rows = headers[:-1], [r[:-1] for r in rows]
        elif len(rows) > 2:
            rows = rows[:-1]
        else:
            break
    x0, y0 = 4, 4
    col_x = [x0]
    for w in widths:
        col_x.append(col_x[-1] + w)
    row_y = [y0 + i * row_h for i in range(len(rows) + 2)]
    W, H = min(W, col_x[-1] + rng.randint(5, 24)), min(H, row_y[-1] + rng.randint(5, 24))  # crop to the table
    texts = []
    for r, row in enumerate([headers, *rows]):
        for c, t in enumerate(row):
            right = c > 0
            xy = (col_x[c + 1] - pad, row_y[r] + row_h // 2) if right else (col_x[c] + pad, row_y[r] + row_h // 2)
            texts.append({"text": t, "xy": list(xy), "anchor": "rm" if right else "lm", "cell": [r, c]})
    return {"type": "table", "width": W, "height": H, "font_size": fs, "headers": headers, "rows": rows,
            "col_x": col_x, "row_y": row_y, "stripes": rng.random() < 0.5, "texts": _boxes(texts, fs)}


def draw_table(scene: dict[str, Any]) -> Image.Image:
    img = Image.new("RGB", (scene["width"], scene["height"]), WHITE)
    draw = ImageDraw.Draw(img)
    cx, ry = scene["col_x"], scene["row_y"]
    draw.rectangle([cx[0], ry[0], cx[-1], ry[1]], fill=HEADER_BG)
    if scene["stripes"]:
        for r in range(2, len(ry) - 1, 2):
            draw.rectangle([cx[0], ry[r], cx[-1], ry[r + 1]], fill=STRIPE_BG)
    for x in cx:
        draw.line([(x, ry[0]), (x, ry[-1])], fill=LINE)
    for y in ry:
        draw.line([(cx[0], y), (cx[-1], y)], fill=LINE)
    _draw_texts(draw, scene)
    return img


def _draw_texts(draw: ImageDraw.ImageDraw, scene: dict[str, Any]) -> None:
    f = font(scene["font_size"])
    for t in scene["texts"]:
        draw.text(tuple(t["xy"]), t["text"], fill=TEXT, font=f, anchor=t["anchor"])


def _boxes(texts: list[dict[str, Any]], fs: int) -> list[dict[str, Any]]:
    for t in texts:
        t["box"] = text_box(tuple(t["xy"]), t["text"], fs, t["anchor"])
    return texts


def _num(s: str) -> float:
    return float(s)


def table_lookup(rng: random.Random, d: Difficulty) -> Drawn:
    scene = table_scene(rng, d)
    img = draw_table(scene)
    headers, rows = scene["headers"], scene["rows"]
    r, c = rng.randrange(len(rows)), rng.randrange(1, len(headers))
    if rng.random() < 0.7:
        q = f"What is the {headers[c]} of {rows[r][0]}? Answer with a number."
        return Drawn([img], q, rows[r][c], "number", scene)
    col = [row[c] for row in rows]
    if col.count(rows[r][c]) > 1:  # the reverse question needs a unique value
        q = f"What is the {headers[c]} of {rows[r][0]}? Answer with a number."
        return Drawn([img], q, rows[r][c], "number", scene)
    q = f"Which {headers[0]} has a {headers[c]} of {rows[r][c]}? Answer with the name."
    return Drawn([img], q, rows[r][0], "text", scene)


def table_total(rng: random.Random, d: Difficulty) -> Drawn:
    scene = table_scene(rng, d)
    img = draw_table(scene)
    headers, rows = scene["headers"], scene["rows"]
    c = rng.randrange(1, len(headers))
    col, h = [row[c] for row in rows], headers[c]
    listing = "\n".join(f"{row[0]}: {row[c]}" for row in rows)
    variant = rng.choice(("total", "diff", "max"))
    if variant == "total":
        total = sum(_num(v) for v in col)
        q = f"What is the total {h} of all rows? Answer with a number."
        trace = f"The {h} column reads:\n{listing}\nAdding them: {' + '.join(col)} = {fmt_num(round(total, 2))}."
        return Drawn([img], q, fmt_num(round(total, 2)), "number", scene, trace)
    if variant == "diff":
        i, j = rng.sample(range(len(rows)), 2)
        a, b = rows[i], rows[j]
        diff = round(_num(a[c]) - _num(b[c]), 2)
        q = f"What is the {h} of {a[0]} minus the {h} of {b[0]}? Answer with a number."
        trace = (f"In the {h} column, {a[0]} has {a[c]} and {b[0]} has {b[c]}.\n"
                 f"{a[c]} - {b[c]} = {fmt_num(diff)}.")
        return Drawn([img], q, fmt_num(diff), "number", scene, trace)
    best = max(_num(v) for v in col)
    if [_num(v) for v in col].count(best) > 1:  # ties: ask for the value instead of the name
        q = f"What is the largest {h} in the table? Answer with a number."
        trace = f"The {h} column reads:\n{listing}\nThe largest is {fmt_num(best)}."
        return Drawn([img], q, fmt_num(best), "number", scene, trace)
    k = [_num(v) for v in col].index(best)
    q = f"Which {headers[0]} has the largest {h}? Answer with the name."
    trace = f"The {h} column reads:\n{listing}\nThe largest is {col[k]}, in the row of {rows[k][0]}."
    return Drawn([img], q, rows[k][0], "text", scene, trace)


# ---- receipts --------------------------------------------------------------------------------


def _receipt_scene(rng: random.Random, d: Difficulty) -> dict[str, Any]:
    H, W, fs = d.pick(rng, "width"), d.pick(rng, "height"), d.pick(rng, "font_size")  # portrait
    W = max(W, 96)
    row_h, pad = fs + 6, 6
    n = max(1, d.pick(rng, "elements"))
    n = min(n, (H - 2 * pad) // row_h - 4, len(ITEMS))
    decimals = rng.random() < d.decimals
    items = rng.sample(ITEMS, max(1, n))
    qty = [rng.randint(1, 4 if d.max_value <= 20 else 9) for _ in items]
    price = [rng.randint(100, max(200, d.max_value * 50)) / 100 if decimals else float(rng.randint(1, max(2, d.max_value // 2)))
             for _ in items]
    money = fmt_money if decimals else fmt_num
    store = rng.choice([s for s in STORES if text_size(s, fs)[0] <= W - 2 * pad] or ["Shop"])
    date = f"{rng.randint(2015, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    number = str(rng.randint(1000, 9999))
    texts: list[dict[str, Any]] = []
    y = pad + fs // 2 + 2

    def line(left: str | None, right: str | None, field: str) -> None:
        nonlocal y
        if left:
            texts.append({"text": left, "xy": [pad, y], "anchor": "lm", "field": field})
        if right:
            texts.append({"text": right, "xy": [W - pad, y], "anchor": "rm", "field": field + ".value"})
        y += row_h

    texts.append({"text": store, "xy": [W // 2, y], "anchor": "mm", "field": "store"})
    y += row_h
    compact = text_size(f"No. {number} {date}", fs)[0] > W - 2 * pad
    if compact:
        line(date, None, "date")
        line(f"No. {number}", None, "number")
    else:
        line(f"No. {number}", date, "number")
        texts[-1]["field"] = "date"
    rule_y = [y - row_h // 2]
    for it, q, p in zip(items, qty, price):
        line(f"{q} {it}" if compact else it, money(p) if compact else f"{q} x {money(p)}", f"item:{it}")
    rule_y.append(y - row_h // 2)
    y_end = y
    return {"type": "receipt", "width": W, "height": min(H, y_end + pad), "font_size": fs, "store": store,
            "date": date, "number": number, "items": items, "qty": qty, "price": price, "decimals": decimals,
            "compact": compact, "texts": _boxes(texts, fs), "rules": rule_y}


def draw_receipt(scene: dict[str, Any]) -> Image.Image:
    img = Image.new("RGB", (scene["width"], scene["height"]), WHITE)
    draw = ImageDraw.Draw(img)
    for y in scene["rules"]:
        draw.line([(4, y), (scene["width"] - 5, y)], fill=LINE)
    _draw_texts(draw, scene)
    return img


def doc_field(rng: random.Random, d: Difficulty) -> Drawn:
    scene = _receipt_scene(rng, d)
    img = draw_receipt(scene)
    money = fmt_money if scene["decimals"] else fmt_num
    options = [
        ("What is the date on this receipt? Answer in YYYY-MM-DD form.", scene["date"], "text"),
        ("What is the receipt number?", scene["number"], "text"),
        ("What is the name of the store?", scene["store"], "text"),
    ]
    i = rng.randrange(len(scene["items"]))
    options.append((f"What is the unit price of {scene['items'][i]}? Answer with a number.", money(scene["price"][i]), "number"))
    q, a, t = rng.choice(options)
    return Drawn([img], q, a, t, scene)


def receipt_total(rng: random.Random, d: Difficulty) -> Drawn:
    scene = _receipt_scene(rng, d)
    img = draw_receipt(scene)
    money = fmt_money if scene["decimals"] else fmt_num
    items, qty, price = scene["items"], scene["qty"], scene["price"]
    if scene["compact"] or rng.random() < 0.3:
        # compact receipts print quantities in front of the item names
        total_q = sum(qty)
        q = "How many units were bought in total? Answer with a number."
        trace = "Quantities on the receipt:\n" + "\n".join(f"{it}: {n}" for it, n in zip(items, qty))
        trace += f"\nAdding them: {' + '.join(str(n) for n in qty)} = {total_q}."
        return Drawn([img], q, str(total_q), "number", scene, trace)
    lines, total = [], 0.0
    for it, n, p in zip(items, qty, price):
        total += n * p
        lines.append(f"{it}: {n} x {money(p)} = {money(round(n * p, 2))}")
    total = round(total, 2)
    q = "What is the total amount to pay for all items? Answer with a number."
    trace = "Each line is quantity times unit price:\n" + "\n".join(lines)
    trace += f"\nSum: {' + '.join(money(round(n * p, 2)) for n, p in zip(qty, price))} = {money(total)}."
    return Drawn([img], q, money(total), "number", scene, trace)


def describe(scene: dict[str, Any]) -> str:
    if scene["type"] == "table":
        h, rows = scene["headers"], scene["rows"]
        body = "; ".join(", ".join(f"{h[c]} {row[c]}" if c else row[0] for c in range(len(h))) for row in rows)
        return f"A table with {len(rows)} rows and the columns {', '.join(h)}. Rows: {body}."
    money = fmt_money if scene["decimals"] else fmt_num
    lines = ", ".join(f"{n} x {it} at {money(p)}" for it, n, p in zip(scene["items"], scene["qty"], scene["price"]))
    return f"A receipt from {scene['store']}, number {scene['number']}, dated {scene['date']}, listing {lines}."
