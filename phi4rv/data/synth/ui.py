"""UI screens (desktop dialogs and mobile app screens) with buttons, text fields, checkboxes, icons
and tabs. Each element keeps its pixel box in the scene, tight around what was drawn for it, and
the effect a click on it has; the grounding answer is that box in fractions (DESIGN.md §3)."""

from __future__ import annotations

import math
import random
from typing import Any

from PIL import Image, ImageDraw

from phi4rv.data.synth.common import (
    TEXT,
    WHITE,
    Difficulty,
    Drawn,
    choice_letters,
    fmt_box,
    fmt_choices,
    font,
    frac_box,
    text_box,
    text_size,
)

BODY = (240, 240, 240)
MENU_BAR = (252, 252, 252)
TITLE_BAR = (45, 50, 60)
FIELD_BORDER = (120, 120, 120)
ICON_BG = (210, 218, 232)
PRIMARY = {"blue": (40, 100, 200), "green": (30, 140, 80), "purple": (110, 60, 170), "red": (190, 50, 50)}

BUTTONS = {
    "OK": "The dialog is confirmed and closes",
    "Cancel": "The dialog closes without changes",
    "Save": "The changes are saved",
    "Delete": "The selected item is deleted",
    "Apply": "The settings are applied",
    "Help": "The help page opens",
    "Next": "The next step is shown",
    "Back": "The previous step is shown",
    "Send": "The message is sent",
    "Sign in": "The sign-in form is submitted",
}
ICONS = {
    "close": ("close", "The window closes"),
    "gear": ("settings", "The settings open"),
    "search": ("search", "A search box opens"),
    "plus": ("add", "A new item is created"),
    "home": ("home", "The home screen is shown"),
    "star": ("favourite", "The item is added to favourites"),
    "bell": ("notifications", "The notifications are shown"),
    "trash": ("delete", "The selected item is moved to the trash"),
}
MENUS = ("File", "Edit", "View", "Tools", "Help")
FIELDS = ("Name", "Email", "Phone", "City", "Password", "Username", "Address", "Title")
CHECKS = ("Remember me", "Dark mode", "Subscribe", "Auto save", "Show hints", "Sync")
TABS = ("Home", "Search", "Profile", "Cart", "Chats", "Maps", "Music")
TAB_ICONS = {"Home": "home", "Search": "search", "Profile": "star", "Cart": "plus", "Chats": "bell", "Maps": "gear",
             "Music": "star"}
TITLES = ("Settings", "Sign up", "Preferences", "New contact", "Export", "Account", "Options")
ROW_TEXTS = ("Wi-Fi", "Bluetooth", "Battery", "Storage", "Sounds", "Privacy", "Display", "Updates")


# ---- icons -----------------------------------------------------------------------------------


def draw_icon(draw: ImageDraw.ImageDraw, kind: str, box: list[int], fg: tuple[int, int, int], bg: tuple[int, int, int]) -> None:
    """A simple glyph on a filled square that is exactly `box` (end exclusive)."""
    x1, y1, x2, y2 = box
    draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=bg)
    s = x2 - x1
    cx, cy, r = (x1 + x2 - 1) / 2, (y1 + y2 - 1) / 2, s * 0.3
    w = max(1, s // 10)
    if kind == "close":
        draw.line([(cx - r, cy - r), (cx + r, cy + r)], fill=fg, width=w)
        draw.line([(cx - r, cy + r), (cx + r, cy - r)], fill=fg, width=w)
    elif kind == "plus":
        draw.line([(cx - r, cy), (cx + r, cy)], fill=fg, width=w)
        draw.line([(cx, cy - r), (cx, cy + r)], fill=fg, width=w)
    elif kind == "search":
        draw.ellipse([cx - r, cy - r, cx + r * 0.4, cy + r * 0.4], outline=fg, width=w)
        draw.line([(cx + r * 0.2, cy + r * 0.2), (cx + r, cy + r)], fill=fg, width=w + 1)
    elif kind == "gear":
        for k in range(8):
            a = k * math.pi / 4
            draw.line([(cx, cy), (cx + r * 1.1 * math.cos(a), cy + r * 1.1 * math.sin(a))], fill=fg, width=w + 1)
        draw.ellipse([cx - r * 0.75, cy - r * 0.75, cx + r * 0.75, cy + r * 0.75], fill=fg)
        draw.ellipse([cx - r * 0.3, cy - r * 0.3, cx + r * 0.3, cy + r * 0.3], fill=bg)
    elif kind == "home":
        draw.polygon([(cx, cy - r), (cx - r, cy), (cx + r, cy)], fill=fg)
        draw.rectangle([cx - r * 0.65, cy, cx + r * 0.65, cy + r], fill=fg)
    elif kind == "star":
        pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(pts, fill=fg)
    elif kind == "bell":
        draw.pieslice([cx - r, cy - r, cx + r, cy + r * 1.2], 180, 360, fill=fg)
        draw.rectangle([cx - r, cy - r * 0.1 + 1, cx + r, cy + r * 0.5], fill=fg)
        draw.ellipse([cx - r * 0.25, cy + r * 0.55, cx + r * 0.25, cy + r], fill=fg)
    elif kind == "trash":
        draw.rectangle([cx - r * 0.7, cy - r * 0.5, cx + r * 0.7, cy + r], fill=fg)
        draw.line([(cx - r, cy - r * 0.75), (cx + r, cy - r * 0.75)], fill=fg, width=w)
    else:
        raise ValueError(f"unknown icon {kind!r}")


# ---- scenes ----------------------------------------------------------------------------------


def _element(kind: str, label: str, box: list[int], action: str | None, name: str, **kw: Any) -> dict[str, Any]:
    return {"type": kind, "label": label, "box": [int(v) for v in box], "action": action, "name": name, **kw}


def _dialog(rng: random.Random, d: Difficulty) -> dict[str, Any]:
    W, H, fs = d.pick(rng, "width"), d.pick(rng, "height"), d.pick(rng, "font_size")
    n = d.pick(rng, "elements")
    pad, tb = max(4, fs // 2), fs + 10
    els: list[dict[str, Any]] = []
    title = rng.choice([t for t in TITLES if text_size(t, fs)[0] < W - tb - 12] or ["Form"])
    els.append(_element("title", title, text_box((pad, tb // 2), title, fs, "lm"), None, f"the title '{title}'",
                        xy=[pad, tb // 2], anchor="lm", fg=list(WHITE)))
    s = tb - 6
    els.append(_element("icon", "close", [W - s - 3, 3, W - 3, 3 + s], ICONS["close"][1], "the close button",
                        icon="close", fg=list(WHITE), bg=[200, 60, 60]))
    bh = fs + 10
    bpad = fs if W >= 300 else fs // 2  # padding either side of a button's label
    n_buttons = min(rng.randint(1, 3), max(1, n - 1))
    fit = lambda k: [b for b in BUTTONS if text_size(b, fs)[0] + 2 * bpad <= (W - pad) / k - pad]  # noqa: E731
    while n_buttons > 1 and len(fit(n_buttons)) < n_buttons:
        n_buttons -= 1
    names = rng.sample(fit(n_buttons) or ["OK"], n_buttons)
    # body rows top-down: optional icon toolbar, fields, checkboxes; the buttons go below them
    top = tb
    regions = [{"box": [0, 0, W, tb], "fill": list(TITLE_BAR)}]
    if W >= 200 and rng.random() < 0.4:  # a menu bar
        mb = fs + 8
        x = pad
        for m in MENUS[: rng.randint(2, len(MENUS))]:
            box = text_box((x, tb + mb // 2), m, fs, "lm")
            if box[2] > W - pad:
                break
            els.append(_element("menu", m, box, f"The {m} menu opens", f"the '{m}' menu",
                                xy=[x, tb + mb // 2], anchor="lm", fg=list(TEXT)))
            x = box[2] + 2 * pad
        regions.append({"box": [0, tb, W, tb + mb], "fill": list(MENU_BAR)})
        top = tb + mb
    y, bottom = top + pad, H - 2 * pad - bh
    rest = n - n_buttons
    row_h = fs + 8
    if rest >= 3 and rng.random() < 0.5:
        k = min(rng.randint(2, 3), rest - 1)
        x = pad
        for kind in rng.sample([i for i in ICONS if i != "close"], k):
            if x + row_h > W - pad:
                break
            els.append(_element("icon", kind, [x, y, x + row_h, y + row_h], ICONS[kind][1], f"the {ICONS[kind][0]} icon",
                                icon=kind, fg=list(TEXT), bg=list(ICON_BG)))
            x += row_h + pad
            rest -= 1
        y += row_h + pad
    labels_w = max(text_size(f, fs)[0] for f in FIELDS)
    fields = rng.sample(FIELDS, len(FIELDS))
    checks = rng.sample(CHECKS, len(CHECKS))
    while rest > 0 and y + row_h <= bottom:
        if fields and rng.random() < 0.6 and W - 3 * pad - labels_w >= 3 * fs:
            f = fields.pop()
            els.append(_element("label", f, text_box((pad, y + row_h // 2), f, fs, "lm"), None, f"the label '{f}'",
                                xy=[pad, y + row_h // 2], anchor="lm", fg=list(TEXT)))
            els.append(_element("field", f, [2 * pad + labels_w, y, W - pad, y + row_h],
                                f"The text cursor moves into the {f} field", f"the text field for '{f}'"))
        else:
            c = next((c for c in checks if text_size(c, fs)[0] + fs + 6 + 2 * pad <= W), None)
            if c is None:
                break
            checks.remove(c)
            checked = rng.random() < 0.5
            tw = text_size(c, fs)[0]
            box = [pad, y + (row_h - fs) // 2, pad + fs + 6 + tw, y + (row_h - fs) // 2 + fs]
            els.append(_element("checkbox", c, box, f"The '{c}' option is switched {'off' if checked else 'on'}",
                                f"the '{c}' checkbox", checked=checked))
        y += row_h + pad
        rest -= 1
    # the window ends a little below its last row: no large empty body
    y2 = min(H - pad, y + rng.randint(0, 3 * row_h) + bh)
    H = y2 + pad
    x = W - pad
    for b in names:
        bw = text_size(b, fs)[0] + 2 * bpad
        els.append(_element("button", b, [x - bw, y2 - bh, x, y2], BUTTONS[b], f"the '{b}' button",
                            bg=list(rng.choice(list(PRIMARY.values()))), fg=list(WHITE)))
        x -= bw + pad
    return {"layout": "dialog", "width": W, "height": H, "font_size": fs, "title": title,
            "regions": [*regions, {"box": [0, top, W, H], "fill": list(BODY)}],
            "elements": els}


def _mobile(rng: random.Random, d: Difficulty) -> dict[str, Any]:
    H, W, fs = d.pick(rng, "width"), d.pick(rng, "height"), d.pick(rng, "font_size")  # portrait
    n = d.pick(rng, "elements")
    pad = max(4, fs // 2)
    primary = list(rng.choice(list(PRIMARY.values())))
    bar = fs + 14
    els: list[dict[str, Any]] = []
    title = rng.choice([t for t in TITLES if text_size(t, fs)[0] < W - 2 * bar] or ["App"])
    els.append(_element("title", title, text_box((pad, bar // 2), title, fs, "lm"), None, f"the title '{title}'",
                        xy=[pad, bar // 2], anchor="lm", fg=list(WHITE)))
    s = bar - 8
    x = W - pad
    n_top = min(rng.randint(1, 2), max(1, n // 3))
    for kind in rng.sample(["search", "bell", "gear", "plus"], n_top):
        els.append(_element("icon", kind, [x - s, 4, x, 4 + s], ICONS[kind][1], f"the {ICONS[kind][0]} icon",
                            icon=kind, fg=list(WHITE), bg=[max(0, c - 35) for c in primary]))
        x -= s + pad
    # the tab bar's size first; it is placed at the bottom once the body's height is known
    fit_tabs = W // max(1, text_size("Profile", fs)[0] + 6)
    n_tabs = max(2, min(4, (n - n_top) // 2 + 1, fit_tabs))
    tab_h = 2 * fs + 12
    fitting = [t for t in TABS if text_size(t, fs)[0] + 4 <= W // n_tabs]
    tabs = rng.sample(fitting, min(n_tabs, len(fitting)))
    # body: rows with a label and an action button
    y, bottom = bar + pad, H - tab_h - pad
    rest = max(1, n - n_top - len(tabs))
    row_h = fs + 12
    rows = rng.sample(ROW_TEXTS, len(ROW_TEXTS))
    bpad = fs if W >= 300 else fs // 2
    buttons = [b for b in BUTTONS if text_size(b, fs)[0] + 2 * bpad < W // 2]
    rng.shuffle(buttons)
    while rest > 0 and y + row_h <= bottom and rows and buttons:
        r, b = rows.pop(), buttons.pop()
        els.append(_element("label", r, text_box((pad, y + row_h // 2), r, fs, "lm"), None, f"the label '{r}'",
                            xy=[pad, y + row_h // 2], anchor="lm", fg=list(TEXT)))
        bw = text_size(b, fs)[0] + 2 * bpad
        els.append(_element("button", b, [W - pad - bw, y + 2, W - pad, y + row_h - 2], BUTTONS[b],
                            f"the '{b}' button next to '{r}'", bg=primary, fg=list(WHITE)))
        y += row_h + pad
        rest -= 1
    H = min(H, y + rng.randint(0, 6) * row_h + tab_h)  # some empty space, not a screenful
    cell = W / max(1, len(tabs))
    for i, t in enumerate(tabs):
        cx = round(cell * (i + 0.5))
        isz = fs + 2
        icon_box = [cx - isz // 2, H - tab_h + 3, cx - isz // 2 + isz, H - tab_h + 3 + isz]
        lb = text_box((cx, H - 4), t, fs, "ms")
        box = [min(icon_box[0], lb[0]), icon_box[1], max(icon_box[2], lb[2]), max(icon_box[3], lb[3])]
        els.append(_element("tab", t, box, f"The {t} tab is shown", f"the '{t}' tab", icon=TAB_ICONS[t],
                            icon_box=icon_box, xy=[cx, H - 4], anchor="ms", selected=i == 0))
    return {"layout": "mobile", "width": W, "height": H, "font_size": fs, "title": title,
            "regions": [{"box": [0, 0, W, bar], "fill": primary}, {"box": [0, bar, W, H - tab_h], "fill": list(WHITE)},
                        {"box": [0, H - tab_h, W, H], "fill": [248, 248, 248]}],
            "elements": els}


def make_scene(rng: random.Random, d: Difficulty) -> dict[str, Any]:
    return _dialog(rng, d) if rng.random() < 0.6 else _mobile(rng, d)


def draw(scene: dict[str, Any]) -> Image.Image:
    img = Image.new("RGB", (scene["width"], scene["height"]), WHITE)
    dr = ImageDraw.Draw(img)
    f = font(scene["font_size"])
    for r in scene["regions"]:
        x1, y1, x2, y2 = r["box"]
        dr.rectangle([x1, y1, x2 - 1, y2 - 1], fill=tuple(r["fill"]))
    for e in scene["elements"]:
        x1, y1, x2, y2 = e["box"]
        t = e["type"]
        if t in ("title", "label", "menu"):
            dr.text(tuple(e["xy"]), e["label"], fill=tuple(e["fg"]), font=f, anchor=e["anchor"])
        elif t == "icon":
            draw_icon(dr, e["icon"], e["box"], tuple(e["fg"]), tuple(e["bg"]))
        elif t == "button":
            dr.rounded_rectangle([x1, y1, x2 - 1, y2 - 1], radius=max(2, (y2 - y1) // 4), fill=tuple(e["bg"]))
            dr.text(((x1 + x2) // 2, (y1 + y2) // 2), e["label"], fill=tuple(e["fg"]), font=f, anchor="mm")
        elif t == "field":
            dr.rectangle([x1, y1, x2 - 1, y2 - 1], fill=WHITE, outline=FIELD_BORDER)
        elif t == "checkbox":
            s = y2 - y1
            dr.rectangle([x1, y1, x1 + s - 1, y2 - 1], fill=WHITE, outline=FIELD_BORDER, width=max(1, s // 8))
            if e["checked"]:
                dr.line([(x1 + s * 0.2, y1 + s * 0.55), (x1 + s * 0.45, y1 + s * 0.8), (x1 + s * 0.8, y1 + s * 0.2)],
                        fill=(30, 120, 60), width=max(2, s // 6))
            dr.text((x1 + s + 6, (y1 + y2) // 2), e["label"], fill=TEXT, font=f, anchor="lm")
        elif t == "tab":
            color = (40, 100, 200) if e["selected"] else (110, 110, 110)
            draw_icon(dr, e["icon"], e["icon_box"], WHITE, color)
            dr.text(tuple(e["xy"]), e["label"], fill=color, font=f, anchor=e["anchor"])
    return img


def targets(scene: dict[str, Any]) -> list[dict[str, Any]]:
    """Elements a user can click (everything with an action)."""
    return [e for e in scene["elements"] if e["action"]]


# ---- tasks -----------------------------------------------------------------------------------


def ui_ground(rng: random.Random, d: Difficulty) -> Drawn:
    scene = make_scene(rng, d)
    e = rng.choice(targets(scene))
    box = frac_box(e["box"], scene["width"], scene["height"])
    q = (f"Where is {e['name']}? Answer with its bounding box [x1, y1, x2, y2] "
         f"as fractions of the image width and height.")
    return Drawn([draw(scene)], q, fmt_box(box), "box", scene, extra={"target": e["name"]})


def ui_click_effect(rng: random.Random, d: Difficulty) -> Drawn:
    scene = make_scene(rng, d)
    clickable = targets(scene)
    e = rng.choice(clickable)
    W, H = scene["width"], scene["height"]
    x1, y1, x2, y2 = e["box"]
    px, py = round((x1 + x2) / 2 / W, 3), round((y1 + y2) / 2 / H, 3)
    others = [o["action"] for o in clickable if o["action"] != e["action"]]
    pool = [a for a in [*BUTTONS.values(), *(v[1] for v in ICONS.values())] if a != e["action"] and a not in others]
    distractors = rng.sample(others, min(2, len(others)))
    distractors += rng.sample(pool, 3 - len(distractors))
    options = [e["action"], *distractors]
    rng.shuffle(options)
    letter = choice_letters(len(options))[options.index(e["action"])]
    q = (f"What happens if I click at the point ({px:.3f}, {py:.3f})? The coordinates are fractions of the "
         f"image width and height.\n{fmt_choices(options)}\nAnswer with the letter.")
    fb = fmt_box(frac_box(e["box"], W, H))
    trace = (f"The point ({px:.3f}, {py:.3f}) lies inside {e['name']}, which spans {fb}.\n"
             f"Clicking it: {e['action'][0].lower() + e['action'][1:]}.\nThat is option {letter}.")
    return Drawn([draw(scene)], q, letter, "choice", scene, trace, choices=options, extra={"point": [px, py]})


def describe(scene: dict[str, Any]) -> str:
    els = scene["elements"]
    by = lambda t: [e for e in els if e["type"] == t]  # noqa: E731
    parts = []
    if by("menu"):
        parts.append("a menu bar with " + ", ".join(e["label"] for e in by("menu")))
    if by("field"):
        parts.append("text fields for " + ", ".join(e["label"] for e in by("field")))
    if by("checkbox"):
        parts.append(", ".join(f"a {'checked' if e['checked'] else 'unchecked'} '{e['label']}' checkbox" for e in by("checkbox")))
    icons = [e for e in by("icon") if e["icon"] != "close"]
    if icons:
        parts.append("icons for " + ", ".join(ICONS[e["icon"]][0] for e in icons))
    if by("button"):
        parts.append("buttons labelled " + ", ".join(f"'{e['label']}'" for e in by("button")))
    if by("tab"):
        parts.append("a bottom tab bar with " + ", ".join(e["label"] for e in by("tab")))
    what = "A desktop dialog" if scene["layout"] == "dialog" else "A mobile app screen"
    return f"{what} titled '{scene['title']}' with " + "; ".join(parts) + "."
