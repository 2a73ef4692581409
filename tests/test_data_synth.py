"""Synthetic generators: the sample contract, determinism, and answers checked against the scene
and against the rendered pixels (re-measured bars, points and slices; table and receipt text
re-rendered cell by cell; UI boxes tight around what was drawn; figures drawn to scale)."""

import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from phi4rv.data import verify
from phi4rv.data.formats import mode_of, read_samples
from phi4rv.data.synth import DIFFICULTIES, GENERATORS, with_knobs
from phi4rv.processing.image import load_image

SEEDS = range(6)
TEXT = (20, 20, 20)
COLORS = {  # the palette, spelled out here rather than imported from the code under test
    "red": (214, 39, 40), "blue": (31, 119, 180), "green": (44, 160, 44), "orange": (255, 127, 14),
    "purple": (148, 103, 189), "brown": (140, 86, 75), "pink": (227, 119, 194), "gray": (127, 127, 127),
    "olive": (188, 189, 34), "cyan": (23, 190, 207),
}


def pixels(sample, k=0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample.images[k])).convert("RGB")).astype(int)


def mask_of(img: np.ndarray, rgb) -> np.ndarray:
    return (img == np.array(rgb)).all(axis=2)


def samples(task, difficulties=("tiny", "default"), seeds=SEEDS):
    return [GENERATORS[task].generate(seed, d) for d in difficulties for seed in seeds]


# ---- contract --------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(GENERATORS))
def test_contract(task):
    for d in ("tiny", "default", "hard"):
        for seed in range(3 if d != "hard" else 1):
            s = GENERATORS[task].generate(seed, d)
            m = s.meta
            assert {"task", "kind", "mode", "answer", "answer_type", "scene", "seed", "generator"} <= set(m)
            assert m["task"] == task and m["seed"] == seed and m["answer_type"] in verify.ANSWER_TYPES
            assert (m["kind"], m["mode"]) in {("perception", "nothink"), ("reasoning", "think")}
            json.dumps(m)  # JSON-serialisable, scene included
            [user, assistant] = s.messages
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert user["content"] == "<image>\n" * len(s.images) + user["content"].split("<image>\n")[-1]
            assert s.num_image_tags == len(s.images) >= 1
            answer = assistant["content"]
            assert mode_of(answer) == m["mode"]
            if m["mode"] == "think":
                assert answer.startswith("<think>\n") and answer.endswith(f"\n</think>\n\n{m['answer']}")
                trace = answer[len("<think>\n") : answer.index("\n</think>")]
                assert len(trace) >= 8 and "\n" in trace  # a real trace: several steps
            else:
                assert answer == m["answer"]
            assert verify.check_format(m["answer"], m["answer_type"]) is None, (task, m["answer"])
            for ref in s.images:
                img = load_image(ref)
                if d == "tiny":
                    assert 64 <= img.width <= 200 and 64 <= img.height <= 200, img.size
            if m["answer_type"] == "box":
                x1, y1, x2, y2 = (float(v) for v in re.findall(r"\d\.\d{4}", m["answer"]))
                assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1


@pytest.mark.parametrize("task", list(GENERATORS))
def test_deterministic_by_seed(task):
    g = GENERATORS[task]
    a, b, c = g.generate(11, "default"), g.generate(11, "default"), g.generate(12, "default")
    assert a == b and a.images == b.images  # byte-identical PNGs
    assert c.images != a.images


def test_knobs_change_the_picture():
    big = with_knobs("tiny", width=(400, 400), height=(300, 300), elements=(6, 6))
    s = GENERATORS["chart_value"].generate(3, big)
    scene = s.meta["scene"]
    assert (scene["width"], scene["height"]) == (400, 300) and len(scene["values"]) == (6 if scene["type"] != "pie" else 6)
    assert DIFFICULTIES["tiny"].elements[1] <= 3


# ---- charts ----------------------------------------------------------------------------------


def _asked_label(question, labels):
    found = [lab for lab in labels if re.search(rf"\b{re.escape(lab)}\b", question)]
    return found


def _axis_value(scene, height_px):
    x0, y0, x1, y1 = scene["plot"]
    return height_px / (y1 - y0) * scene["y_max"]


def _measure_bars(img, scene):
    """Bar runs found in the row just above the axis, each bar's height scanned from the pixels."""
    color = COLORS[scene["color"]]
    y1 = scene["plot"][3]
    row = mask_of(img, color)[y1 - 1]
    runs, x = [], 0
    while x < len(row):
        if row[x]:
            start = x
            while x < len(row) and row[x]:
                x += 1
            runs.append((start, x))
        x += 1
    heights = []
    for a, b in runs:
        col = mask_of(img, color)[:, (a + b) // 2]
        y = y1 - 1
        while col[y]:
            y -= 1
        heights.append(y1 - 1 - y)
    return heights


def _measure_points(img, scene):
    """Centres of the black markers, left to right."""
    x0, y0, x1, y1 = scene["plot"]
    black = mask_of(img, (0, 0, 0))
    cols = np.where(black.any(axis=0))[0]
    groups, cur = [], [cols[0]]
    for c in cols[1:]:
        if c - cur[-1] > 1:
            groups.append(cur)
            cur = []
        cur.append(c)
    groups.append(cur)
    centres = []
    for g in groups:
        ys = np.where(black[:, g[0] : g[-1] + 1].any(axis=1))[0]
        centres.append((ys.min() + ys.max()) / 2)
    return [y1 - c for c in centres]


def _measure_pie(img, scene):
    (cx, cy), R = scene["center"], scene["radius"]
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= (R - 1) ** 2
    counts = [int((mask_of(img, COLORS[c]) & inside).sum()) for c in scene["colors"]]
    return [c / inside.sum() for c in counts]


@pytest.mark.parametrize("task", ["chart_value", "chart_compare", "chart_sum", "chart_trend"])
def test_charts_pixels_agree_with_scene(task):
    kinds = set()
    for s in samples(task, seeds=range(10)):
        scene, img = s.meta["scene"], pixels(s)
        kinds.add(scene["type"])
        if scene["type"] == "pie":
            assert sum(scene["values"]) == 100
            for share, v in zip(_measure_pie(img, scene), scene["values"]):
                assert abs(share - v / 100) < 0.03, (share, v)
            continue
        one_px = scene["y_max"] / (scene["plot"][3] - scene["plot"][1])
        measured = _measure_bars(img, scene) if scene["type"] == "bar" else _measure_points(img, scene)
        assert len(measured) == len(scene["values"])
        for h, v in zip(measured, scene["values"]):
            assert abs(_axis_value(scene, h) - v) <= 1.01 * one_px, (h, v)
    assert kinds >= ({"line"} if task == "chart_trend" else {"bar", "line"})


def test_chart_answers_follow_from_scene():
    for s in samples("chart_value", seeds=range(10)):
        scene, q = s.meta["scene"], s.messages[0]["content"]
        [label] = _asked_label(q, scene["labels"])
        assert float(s.meta["answer"]) == scene["values"][scene["labels"].index(label)]
    for s in samples("chart_compare", seeds=range(10)):
        scene, q, a = s.meta["scene"], s.messages[0]["content"], s.meta["answer"]
        vals = dict(zip(scene["labels"], scene["values"]))
        if "How much greater" in q:
            x, y = sorted(_asked_label(q, scene["labels"]), key=q.index)
            assert float(a) == vals[x] - vals[y] > 0
        elif "highest" in q:
            assert a == max(vals, key=vals.get)
        elif "lowest" in q:
            assert a == min(vals, key=vals.get)
        else:
            two = _asked_label(q, scene["labels"])
            assert a == max(two, key=vals.get)
    for s in samples("chart_sum", seeds=range(10)):
        scene, q = s.meta["scene"], s.messages[0]["content"]
        named = _asked_label(q, scene["labels"]) or scene["labels"]
        assert float(s.meta["answer"]) == sum(scene["values"][scene["labels"].index(n)] for n in named)


def test_unlabelled_charts_carry_a_reading_tolerance():
    seen = False
    for s in samples("chart_value", ("default",), range(20)):
        scene = s.meta["scene"]
        if scene["type"] != "pie" and not scene["value_labels"]:
            seen = True
            tol = s.meta["tolerance"]["abs"]
            assert 0 < tol <= scene["y_step"]
            v = float(s.meta["answer"])
            assert verify.check_sample(s.meta, str(v + tol * 0.9)) and not verify.check_sample(s.meta, str(v + tol * 1.1))
    assert seen


# ---- tables and receipts ---------------------------------------------------------------------


def _text_matches(img, box, text, fs) -> bool:
    """The pixels in `box` are `text` as PIL draws it (allowing a 1-pixel offset)."""
    x1, y1, x2, y2 = box
    ring = np.concatenate([img[y1 - 1, x1 - 1 : x2 + 1], img[y2, x1 - 1 : x2 + 1], img[y1:y2, x1 - 1], img[y1:y2, x2]])
    cols, counts = np.unique(ring, axis=0, return_counts=True)
    bg = tuple(int(c) for c in cols[counts.argmax()])
    f = ImageFont.load_default(size=fs)
    l, t, _, _ = f.getbbox(text)
    ref = Image.new("RGB", (x2 - x1 + 2, y2 - y1 + 2), bg)
    ImageDraw.Draw(ref).text((1 - l, 1 - t), text, font=f, fill=TEXT)
    ref = np.asarray(ref).astype(int)
    crop = img[y1 - 1 : y2 + 1, x1 - 1 : x2 + 1]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if np.abs(np.roll(ref, (dy, dx), axis=(0, 1))[1:-1, 1:-1] - crop[1:-1, 1:-1]).max() <= 8:
                return True
    return False


@pytest.mark.parametrize("task", ["table_lookup", "table_total", "doc_field", "receipt_total"])
def test_every_text_is_drawn_where_the_scene_says(task):
    for s in samples(task, seeds=range(4)):
        scene, img = s.meta["scene"], pixels(s)
        for t in scene["texts"]:
            assert _text_matches(img, t["box"], t["text"], scene["font_size"]), (s.id, t)
        # and a wrong text in the same place does not match (the check can fail)
        t = scene["texts"][-1]
        wrong = "".join(chr(ord(c) + 1) if c.isalnum() else c for c in t["text"])
        assert not _text_matches(img, t["box"], wrong, scene["font_size"])


def test_table_cells_hold_the_rows_and_answers_follow():
    for s in samples("table_lookup", seeds=range(10)) + samples("table_total", seeds=range(10)):
        scene, q, a = s.meta["scene"], s.messages[0]["content"].removeprefix("<image>\n"), s.meta["answer"]
        grid = [scene["headers"], *scene["rows"]]
        for t in scene["texts"]:
            r, c = t["cell"]
            assert t["text"] == grid[r][c]
        headers, rows = scene["headers"], scene["rows"]
        col = next(c for c in range(1, len(headers)) if re.search(rf"\b{headers[c]}\b", q))
        names = [r[0] for r in rows if re.search(rf"\b{r[0]}\b", q)]
        values = [float(r[col]) for r in rows]
        if q.startswith("What is the total"):
            assert float(a) == pytest.approx(sum(values))
        elif "minus" in q:
            first, second = sorted(names, key=q.index)
            get = {r[0]: float(r[col]) for r in rows}
            assert float(a) == pytest.approx(get[first] - get[second])
        elif "largest" in q and "Which" in q:
            assert a == rows[values.index(max(values))][0]
        elif "largest" in q:
            assert float(a) == max(values)
        elif q.startswith("Which"):
            v = float(re.search(r"of ([\d.]+)\?", q).group(1))
            assert [r[0] for r in rows if float(r[col]) == v] == [a]
        else:
            [name] = names
            assert a == next(r[col] for r in rows if r[0] == name)


def test_receipt_totals_follow_from_items():
    for s in samples("receipt_total", seeds=range(10)):
        sc, q = s.meta["scene"], s.messages[0]["content"]
        if "units" in q:
            assert int(s.meta["answer"]) == sum(sc["qty"])
        else:
            assert float(s.meta["answer"]) == pytest.approx(sum(n * p for n, p in zip(sc["qty"], sc["price"])))


# ---- UI --------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["ui_ground", "ui_click_effect"])
def test_ui_boxes_are_tight_and_cover_everything_drawn(task):
    for s in samples(task, seeds=range(8)):
        scene, img = s.meta["scene"], pixels(s)
        H, W = img.shape[:2]
        fill = np.zeros_like(img)
        for r in scene["regions"]:
            x1, y1, x2, y2 = r["box"]
            fill[y1:y2, x1:x2] = r["fill"]
        drawn = (img != fill).any(axis=2)  # everything that is not plain background
        covered = np.zeros((H, W), bool)
        for e in scene["elements"]:
            x1, y1, x2, y2 = e["box"]
            covered[max(0, y1 - 1) : y2 + 1, max(0, x1 - 1) : x2 + 1] = True
            ys, xs = np.where(drawn[y1:y2, x1:x2])
            assert len(xs), (s.id, e)
            slack = 3 if e["type"] in ("title", "label", "menu", "tab", "checkbox") else 1
            assert xs.min() <= slack and ys.min() <= slack, (s.id, e["name"])
            assert xs.max() >= x2 - x1 - 1 - slack and ys.max() >= y2 - y1 - 1 - slack, (s.id, e["name"])
        assert not (drawn & ~covered).any(), s.id  # nothing drawn outside the elements


def test_ui_answers_follow_from_scene():
    for s in samples("ui_ground", seeds=range(10)):
        scene = s.meta["scene"]
        q = s.messages[0]["content"]
        [e] = [e for e in scene["elements"] if e["action"] and f"Where is {e['name']}?" in q]
        W, H = scene["width"], scene["height"]
        x1, y1, x2, y2 = e["box"]
        want = f"[{x1 / W:.4f}, {y1 / H:.4f}, {x2 / W:.4f}, {y2 / H:.4f}]"
        assert s.meta["answer"] == want
        assert verify.check_sample(s.meta, want) and not verify.check_sample(s.meta, "[0.0000, 0.0000, 0.0100, 0.0100]")
    for s in samples("ui_click_effect", seeds=range(10)):
        scene, q = s.meta["scene"], s.messages[0]["content"]
        px, py = (float(v) for v in re.search(r"point \(([\d.]+), ([\d.]+)\)", q).groups())
        W, H = scene["width"], scene["height"]
        hit = [e for e in scene["elements"] if e["action"]
               and e["box"][0] <= px * W <= e["box"][2] and e["box"][1] <= py * H <= e["box"][3]]
        assert len(hit) == 1
        options = dict(re.findall(r"^([A-D])\. (.+)$", q, re.M))
        assert options[s.meta["answer"]] == hit[0]["action"]
        assert list(options.values()).count(hit[0]["action"]) == 1


# ---- geometry --------------------------------------------------------------------------------


def test_figures_are_drawn_to_scale():
    outline = (30, 60, 160)
    for task in ("geometry_area", "geometry_length", "geometry_angle"):
        for s in samples(task, seeds=range(8)):
            sc, img = s.meta["scene"], pixels(s)
            ink = mask_of(img, outline)
            ys, xs = np.where(ink)
            if sc["shape"] == "circle":
                R = sc["radius_px"]
                assert abs((xs.max() - xs.min()) - 2 * R) <= 2 and abs((ys.max() - ys.min()) - 2 * R) <= 2
                continue
            v = np.array(sc["vertices"])
            assert abs(xs.min() - v[:, 0].min()) <= 2 and abs(xs.max() - v[:, 0].max()) <= 2
            assert abs(ys.min() - v[:, 1].min()) <= 2 and abs(ys.max() - v[:, 1].max()) <= 2
            for i in range(len(v)):  # every edge is drawn along its whole length
                a, b = v[i], v[(i + 1) % len(v)]
                for t in (0.25, 0.5, 0.75):
                    x, y = (a + t * (b - a)).round().astype(int)
                    assert ink[y - 1 : y + 2, x - 1 : x + 2].any(), (s.id, i, t)
            if sc["shape"] == "triangle":
                for k, want in enumerate(sc["angles"]):
                    p, q, r = v[k], v[(k + 1) % 3], v[(k + 2) % 3]
                    u, w = q - p, r - p
                    got = math.degrees(math.acos(u @ w / np.linalg.norm(u) / np.linalg.norm(w)))
                    assert abs(got - want) < 2.0, (got, want)
                assert sum(sc["angles"]) == 180 and s.meta["answer"] == str(sc["angles"][2])
            else:
                # labelled lengths are proportional to the drawn ones
                sides = sc["sides"]
                if sc["shape"] == "rectangle":
                    w_px, h_px = np.linalg.norm(v[1] - v[0]), np.linalg.norm(v[2] - v[1])
                    assert w_px / h_px == pytest.approx(sides["width"] / sides["height"], rel=0.05)
                elif sc["shape"] == "right_triangle":
                    a_px, b_px = np.linalg.norm(v[2] - v[1]), np.linalg.norm(v[1] - v[0])
                    assert a_px / b_px == pytest.approx(sides["base"] / sides["height"], rel=0.05)
                    assert sides["base"] ** 2 + sides["height"] ** 2 == sides["hypotenuse"] ** 2


def test_geometry_answers_follow_from_scene():
    for s in samples("geometry_area", seeds=range(12)):
        sc, a = s.meta["scene"], float(s.meta["answer"])
        sides = sc.get("sides", {})
        want = {
            "rectangle": lambda: sides["width"] * sides["height"],
            "right_triangle": lambda: sides["base"] * sides["height"] / 2,
            "trapezoid": lambda: (sides["top"] + sides["bottom"]) * sides["height"] / 2,
            "circle": lambda: 3.14 * sc["radius"] ** 2,
        }[sc["shape"]]()
        assert a == pytest.approx(want)
    for s in samples("math_expr", seeds=range(12)):
        expr = " ".join(s.meta["scene"]["tokens"][:-2])
        assert int(s.meta["answer"]) == eval(expr)


# ---- captions and multi-image sets -------------------------------------------------------------


def _shape_colors(img):
    codes = img[..., 0] * 65536 + img[..., 1] * 256 + img[..., 2]
    return {name for name, (r, g, b) in COLORS.items() if (codes == r * 65536 + g * 256 + b).sum() > 20}


def test_shape_scenes_and_captions():
    n = 0
    for s in samples("caption", seeds=range(16)):
        sc = s.meta["scene"]
        assert len(s.meta["answer"]) > 30
        if sc["family"] != "shapes":
            continue
        n += 1
        img = pixels(s)
        for shape in sc["shapes"]:
            x1, y1, x2, y2 = shape["box"]
            ys, xs = np.where(mask_of(img, COLORS[shape["color"]]))
            assert abs(xs.min() - x1) <= 1 and abs(xs.max() - (x2 - 1)) <= 1 and abs(ys.max() - (y2 - 1)) <= 1
            assert f"{shape['color']} {shape['kind']}" in s.meta["answer"]
        assert _shape_colors(img) == {sh["color"] for sh in sc["shapes"]}
    assert n >= 3


def test_multi_diff_changes_only_what_it_says():
    for s in samples("multi_diff", ("tiny",), range(10)) + samples("multi_diff", ("default",), range(4)):
        sc = s.meta["scene"]
        before, after = pixels(s, 0), pixels(s, 1)
        changed = (before != after).any(axis=2)
        # the shapes that differ between the two scenes, found by comparing the scenes
        b = {(x["color"], x["cell"], x["kind"]) for x in sc["before"]["shapes"]}
        a = {(x["color"], x["cell"], x["kind"]) for x in sc["after"]["shapes"]}
        boxes = [x["box"] for x in sc["before"]["shapes"] + sc["after"]["shapes"]
                 if (x["color"], x["cell"], x["kind"]) in b ^ a]
        allowed = np.zeros_like(changed)
        for x1, y1, x2, y2 in boxes:
            allowed[y1:y2, x1:x2] = True
        assert changed.any() and not (changed & ~allowed).any()
        options = dict(re.findall(r"^([A-D])\. (.+)$", s.messages[0]["content"], re.M))
        truth = options[s.meta["answer"]]
        if len(a) < len(b):
            assert "removed" in truth and _shape_colors(before) - _shape_colors(after) == {truth.split()[1]}
        elif len(a) > len(b):
            assert "added" in truth and _shape_colors(after) - _shape_colors(before) == {truth.split()[1]}
        elif "turned" in truth:
            assert truth.split()[-1] in _shape_colors(after) - _shape_colors(before)
        else:
            assert "moved" in truth


def test_multi_order_and_match_follow_from_pixels():
    fill = (40, 150, 90)
    for s in samples("multi_order", ("tiny",), range(8)) + samples("multi_order", ("default",), range(3)):
        progress = []
        for k in range(len(s.images)):
            img = pixels(s, k)
            if s.meta["scene"]["what"].startswith("a progress bar"):
                row = mask_of(img, fill)[img.shape[0] // 2]
                progress.append(row.sum())
            else:
                progress.append(len(_shape_colors(img)))
        want = ", ".join(str(k + 1) for k in sorted(range(len(progress)), key=progress.__getitem__))
        assert s.meta["answer"] == want and len(set(progress)) == len(progress)
    for s in samples("multi_match", ("tiny",), range(8)) + samples("multi_match", ("default",), range(3)):
        captions = dict(re.findall(r"^([A-D])\. (.+)$", s.messages[0]["content"], re.M))
        letters = [x.strip() for x in s.meta["answer"].split(",")]
        assert sorted(letters) == sorted(captions)
        for k, letter in enumerate(letters):
            shapes_part = captions[letter].split("background:")[1]
            said = {c for c in COLORS if re.search(rf"\b{c}\b", shapes_part)}
            assert said == _shape_colors(pixels(s, k))


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_synth_writes_shards_manifest_and_preview(tmp_path):
    from phi4rv.cli import main

    out = tmp_path / "syn"
    assert main(["data", "synth", "--task", "chart_value,ui_ground", "--task", "multi_order", "--n", "5",
                 "--seed", "3", "--difficulty", "tiny", "--out", str(out), "--shard-size", "4", "--preview"]) == 0
    back = list(read_samples(out))
    assert len(back) == 15 and len(list(out.glob("shard-*.parquet"))) == 4
    assert len({s.id for s in back}) == 15
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["requested_tasks"] == ["chart_value", "ui_ground", "multi_order"] and manifest["samples"] == 15
    assert manifest["tasks"] == {"chart_value": 5, "multi_order": 5, "ui_ground": 5}
    assert manifest["task_modes"]["multi_order"] == {"think": 5}
    # every sample regenerates from its own seed
    s = back[7]
    assert GENERATORS[s.meta["task"]].generate(s.meta["seed"], "tiny") == s
    sheet = Image.open(out / "preview.png")
    assert sheet.width > 1000 and sheet.height > 300
    # a rerun with the same seed gives the same data
    out2 = tmp_path / "again"
    assert main(["data", "synth", "--task", "chart_value,ui_ground,multi_order", "--n", "5", "--seed", "3",
                 "--difficulty", "tiny", "--out", str(out2), "--shard-size", "4"]) == 0
    assert list(read_samples(out2)) == back
    assert main(["data", "synth", "--task", "nope", "--out", str(tmp_path / "x")]) == 1


def test_throughput_bench_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench" / "data_throughput.py"
    out = tmp_path / "fig.json"
    proc = subprocess.run([sys.executable, str(bench), "--tiny", "--tasks", "chart_value", "multi_order", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fig = json.loads(out.read_text())
    assert set(fig["generators"]) == {"chart_value", "multi_order"} and fig["curation"]["samples"] == 2 * len(GENERATORS)
    assert all(r["samples_per_s"] > 0 for r in fig["generators"].values())
    assert "samples/s/core" in proc.stdout and "cpu" in fig["machine"]
