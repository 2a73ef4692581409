"""Curation: every planted defect is caught and classed, fixable formatting is repaired, nothing
good is dropped, duplicates go, and a teacher's error rate drops a bad dataset."""

import io
import json
from dataclasses import replace

from PIL import Image

from phi4rv.data.curate import CurateConfig, curate, dhash, hamming
from phi4rv.data.formats import Sample, read_samples, write_jsonl, write_parquet
from phi4rv.data.synth import GENERATORS
from phi4rv.data.teacher import TeacherConfig


def png(size=(32, 32), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def good_samples():
    """A mix of tasks and answer types, all correct."""
    tasks = ["chart_value", "ui_ground", "ui_click_effect", "multi_order", "caption", "table_total",
             "doc_field", "multi_match", "geometry_area", "chart_value", "table_lookup", "multi_diff"]
    out = [GENERATORS[t].generate(500 + k, "tiny") for k, t in enumerate(tasks)]
    # same image, another question (not a duplicate)
    s = out[0]
    scene = s.meta["scene"]
    k = 1 if scene["labels"][0] in s.messages[0]["content"] else 0
    other = replace(s, id="same-image-other-question",
                    messages=[{"role": "user", "content": f"<image>\nHow big is {scene['labels'][k]}, in the chart? Answer with a number."},
                              {"role": "assistant", "content": str(scene["values"][k])}],
                    meta={**s.meta, "answer": str(scene["values"][k])})
    return out + [other]


def with_answer(s, text, sid, **meta):
    return replace(s, id=sid, messages=[s.messages[0], {"role": "assistant", "content": text}], meta={**s.meta, **meta})


def fresh(task, k):
    return GENERATORS[task].generate(700 + k, "tiny")


def planted(good):
    """Defective samples; each built on a fresh scene so that a repaired one is no duplicate."""
    chart, ui, click, order = fresh("chart_value", 0), fresh("ui_ground", 1), fresh("ui_click_effect", 2), fresh("multi_order", 3)
    v = int(chart.meta["answer"])
    x1, y1, x2, y2 = next(e["box"] for e in ui.meta["scene"]["elements"] if f"Where is {e['name']}?" in ui.messages[0]["content"])
    q = {"role": "user", "content": "<image>\nWhat colour is this?"}
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(good[0].images[0])).save(jpeg, format="JPEG", quality=92)
    bad = {
        # bad question or image
        "image_unreadable": Sample("d-unreadable", [q, {"role": "assistant", "content": "red"}], [b"not an image at all"]),
        "image_too_large": Sample("d-large", [q, {"role": "assistant", "content": "red"}], [png((700, 700))]),
        "image_too_small": Sample("d-small", [q, {"role": "assistant", "content": "red"}], [png((4, 4))]),
        "image_count_mismatch": Sample("d-count", [{"role": "user", "content": "<image>\n<image>\nSame?"},
                                                   {"role": "assistant", "content": "yes"}], [png()]),
        "missing_question": Sample("d-noq", [{"role": "user", "content": "<image>\n"}, {"role": "assistant", "content": "red"}], [png()]),
        # wrong answers
        "missing_answer": replace(chart, id="d-noanswer", messages=[chart.messages[0], {"role": "assistant", "content": "  "}]),
        "answer_mismatch": with_answer(chart, str(v + 7), "d-wrong"),
        "number_missing": with_answer(chart, "many", "d-nan"),
        "unclosed_think": with_answer(order, "<think>\nImage 1 shows", "d-unclosed"),
        "box_format": with_answer(ui, "[1.5, 0.2, 2.5, 0.4]", "d-badbox"),
    }
    ui2 = fresh("ui_ground", 4)
    W2, H2 = ui2.meta["scene"]["width"], ui2.meta["scene"]["height"]
    a1, b1, a2, b2 = next(e["box"] for e in ui2.meta["scene"]["elements"] if f"Where is {e['name']}?" in ui2.messages[0]["content"])
    chart2, chart3 = fresh("chart_value", 5), fresh("chart_value", 6)
    fixable = {
        "number_format": with_answer(chart, f"{v}.", "f-number"),
        "box_format": with_answer(ui, f"[{x1}, {y1}, {x2}, {y2}]", "f-pixels"),
        "box_format ": with_answer(ui2, "[{:.4f}, {:.4f}, {:.4f}, {:.4f}]".format(a2 / W2, b1 / H2, a1 / W2, b2 / H2), "f-swapped"),
        "choice_format": with_answer(click, f"({click.meta['answer'].lower()})", "f-choice"),
        "order_format": with_answer(order, order.messages[1]["content"].rsplit("\n\n", 1)[0] + "\n\n"
                                    + order.meta["answer"].replace(", ", " "), "f-order"),
        "whitespace": with_answer(chart2, f"  {chart2.meta['answer']}\n", "f-space"),
        "repeated_marker": with_answer(chart3, "<|dummy_84|>" * 3 + chart3.meta["answer"], "f-marker"),
    }
    dups = {
        "exact_duplicate": replace(good[0], id="x-exact"),
        "near_duplicate": replace(good[0], id="x-near", images=[jpeg.getvalue()]),
    }
    return bad, fixable, dups


def run(tmp_path, datasets, **kw):
    paths = []
    for name, samples in datasets.items():
        path = tmp_path / f"{name}.parquet"
        write_parquet(samples, path)
        paths.append(path)
    cfg = CurateConfig(max_pixels=300_000, **kw)
    report = curate(paths, cfg, tmp_path / "out")
    return report, {s.id: s for s in read_samples(tmp_path / "out")} if report["kept"] else {}


def test_each_defect_is_caught_and_nothing_good_is_dropped(tmp_path):
    good = good_samples()
    bad, fixable, dups = planted(good)
    data = good + list(bad.values()) + list(fixable.values()) + list(dups.values())
    report, kept = run(tmp_path, {"mixed": data})
    d = report["datasets"]["mixed"]

    assert set(kept) == {s.id for s in good} | {s.id for s in fixable.values()}
    assert d["classes"] == {"keep": len(good), "fixable_format": len(fixable), "wrong_answer": 5,
                            "bad_question_or_image": 5}
    assert d["duplicates"] == 2 and d["total"] == len(data) and d["kept"] == len(kept)
    removed = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "out" / "removed.jsonl").read_text().splitlines()}
    for reason, s in bad.items():
        assert removed[s.id]["reasons"] == [reason], (reason, removed[s.id])
    wrong = {k for k, r in removed.items() if r["class"] == "wrong_answer"}
    assert {s.id for s in read_samples(tmp_path / "out" / "wrong_answers")} == wrong  # handed on for regeneration
    assert removed["x-exact"]["reasons"] == ["exact_duplicate"] and removed["x-near"]["reasons"] == ["near_duplicate"]
    for s in good:  # untouched
        assert kept[s.id].messages == s.messages and kept[s.id].images == s.images
        assert kept[s.id].meta["curation"] == {"class": "keep"}

    # repairs: the canonical form, still agreeing with the ground truth
    chart, ui, click, order = fresh("chart_value", 0), fresh("ui_ground", 1), fresh("ui_click_effect", 2), fresh("multi_order", 3)
    assert kept["f-number"].messages[-1]["content"] == chart.meta["answer"]
    assert kept["f-space"].messages[-1]["content"] == fresh("chart_value", 5).meta["answer"]
    assert kept["f-pixels"].messages[-1]["content"] == ui.meta["answer"]
    assert kept["f-swapped"].messages[-1]["content"] == fresh("ui_ground", 4).meta["answer"]
    assert kept["f-choice"].messages[-1]["content"] == click.meta["answer"]
    assert kept["f-marker"].messages[-1]["content"] == "<|dummy_84|>" + fresh("chart_value", 6).meta["answer"]
    assert kept["f-order"].messages[-1]["content"] == order.messages[-1]["content"]
    assert kept["f-pixels"].meta["curation"] == {"class": "fixable_format", "repairs": ["box_format"]}

    md = (tmp_path / "out" / "report.md").read_text()
    for word in ("keep", "wrong_answer", "bad_question_or_image", "fixable_format", "image_unreadable", "d-wrong"):
        assert word in md
    plot = Image.open(tmp_path / "out" / "removals.png")
    assert plot.width > 300 and plot.height > 200
    assert json.loads((tmp_path / "out" / "report.json").read_text())["kept"] == len(kept)


def test_repair_off_drops_fixable_and_duplicates_cross_datasets(tmp_path):
    good = good_samples()
    _, fixable, _ = planted(good)
    copy_in_b = replace(good[3], id="b-copy")
    report, kept = run(tmp_path, {"a": good + list(fixable.values()), "b": [copy_in_b]}, repair=False)
    assert set(kept) == {s.id for s in good}
    assert report["datasets"]["a"]["classes"]["fixable_format"] == len(fixable)
    assert report["datasets"]["b"]["duplicates"] == 1 and report["datasets"]["b"]["kept"] == 0


def test_jsonl_with_missing_image_file(tmp_path):
    (tmp_path / "ok.png").write_bytes(png())
    s_ok = Sample("ok", [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "red"}], [str(tmp_path / "ok.png")])
    s_missing = Sample("gone", [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "red"}], [str(tmp_path / "gone.png")])
    write_jsonl([s_ok, s_missing], tmp_path / "d.jsonl")
    (tmp_path / "gone.png").unlink(missing_ok=True)
    report = curate([tmp_path / "d.jsonl"], CurateConfig(), tmp_path / "out")
    d = report["datasets"]["d"]
    assert d["kept"] == 1 and d["reasons"] == {"image_missing": 1}


def test_dhash_is_stable_under_reencoding_and_tells_images_apart():
    a = GENERATORS["chart_value"].generate(1, "default")
    b = GENERATORS["chart_value"].generate(2, "default")
    img = Image.open(io.BytesIO(a.images[0]))
    jpeg = io.BytesIO()
    img.save(jpeg, format="JPEG", quality=85)
    ha, hj, hb = dhash(img), dhash(Image.open(jpeg)), dhash(Image.open(io.BytesIO(b.images[0])))
    assert hamming(ha, hj) <= 4 < hamming(ha, hb)


def test_teacher_error_rate_drops_a_dataset(tmp_path):
    from test_data_teacher import FakeTeacher

    clean = [GENERATORS[t].generate(900 + k, "tiny") for k, t in enumerate(["chart_value", "table_lookup", "doc_field", "ui_ground"] * 2)]
    # an "open" dataset without ground truth in meta: half its answers are wrong
    noisy = []
    for k, t in enumerate(["chart_value", "table_lookup"] * 3):
        s = GENERATORS[t].generate(950 + k, "tiny")
        truth = s.meta["answer"]
        wrong = str(int(float(truth)) + 100) if s.meta["answer_type"] == "number" else "Nobody"
        answer = truth if k % 2 else wrong
        meta = {kk: vv for kk, vv in s.meta.items() if kk not in ("answer", "scene")}
        noisy.append(replace(s, messages=[s.messages[0], {"role": "assistant", "content": answer}], meta={**meta, "truth": truth}))
    truths = {s.messages[0]["content"].split("<image>\n")[-1].strip(): s.meta["answer"] for s in clean}
    truths.update({s.messages[0]["content"].split("<image>\n")[-1].strip(): s.meta["truth"] for s in noisy})

    def oracle(question, n):
        base = question.rsplit(" Answer the question", 1)[0]
        return ("answer", f"<think>\nchecking\n</think>\n\n{truths[base]}")

    with FakeTeacher(oracle) as server:
        teacher = TeacherConfig(endpoint=server.url, model="judge", concurrency=4, timeout=5, max_retries=1,
                                backoff=0.01, attempts=1, temperature=0.0)
        report, kept = run(tmp_path, {"clean": clean, "noisy": noisy}, teacher=teacher, max_error_rate=0.2)
    c, n = report["datasets"]["clean"], report["datasets"]["noisy"]
    assert c["teacher"]["checked"] == len(clean) and c["teacher"]["error_rate"] == 0 and not c["dropped"]
    assert n["teacher"]["checked"] == len(noisy) and n["teacher"]["disagreed"] == 3 and n["dropped"]
    assert n["teacher"]["error_rate"] == 0.5 and n["classes"]["wrong_answer"] == 3
    assert set(kept) == {s.id for s in clean}
    assert "dropped" in (tmp_path / "out" / "report.md").read_text()


def test_cli_curate(tmp_path, capsys):
    from phi4rv.cli import main

    good = good_samples()
    bad, _, _ = planted(good)
    write_parquet(good + list(bad.values()), tmp_path / "in.parquet")
    assert main(["data", "curate", str(tmp_path / "in.parquet"), "--out", str(tmp_path / "out")]) == 0
    assert f"{len(good) + len(bad)} in, {len(good) + 1} out" in capsys.readouterr().out
    assert len(list(read_samples(tmp_path / "out"))) == len(good) + 1  # the 700x700 image is fine at the default limit


# ---- verify: the answer checks curation and teacher synthesis share ----------------------------


def test_verify_answer_types():
    from phi4rv.data.verify import Tolerance, verify

    assert verify("The answer is 1,234.", "1234", "number")
    assert verify("<think>\n40 + 2 = 42, no wait\n</think>\n\n7", "7", "number")
    assert not verify("<think>\nthe answer is 7", "7", "number")  # unclosed thinking: no answer
    assert not verify("103", "100", "number") and verify("103", "100", "number", Tolerance(rel=0.05))
    assert verify("-4", "-4", "number") and not verify("4", "-4", "number")
    for said in ("B", "(b)", "B. The changes are saved", "option B", "The answer is B", "The changes are saved"):
        assert verify(said, "B", "choice", choices=["A new item is created", "The changes are saved"]), said
    assert not verify("A new item is created", "B", "choice", choices=["A new item is created", "The changes are saved"])
    # boxes by IoU: [0, 0, .5, .5] vs [.25, 0, .75, .5]: overlap .125, union .375 -> IoU 1/3
    assert verify("[0.25, 0.0, 0.75, 0.5]", "[0.0000, 0.0000, 0.5000, 0.5000]", "box", Tolerance(iou=0.33))
    assert not verify("[0.25, 0.0, 0.75, 0.5]", "[0.0000, 0.0000, 0.5000, 0.5000]", "box", Tolerance(iou=0.34))
    assert verify("2,3,1", "2, 3, 1", "order") and not verify("2, 1, 3", "2, 3, 1", "order")
    assert verify("  the Lemon. ", "Lemon", "text") and not verify("Lime", "Lemon", "text")


def test_box_repair_from_pixels():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from phi4rv.data.verify import check_format, repair_format

    @settings(max_examples=200, deadline=None)
    @given(st.integers(1, 2000), st.integers(1, 2000), st.data())
    def check(W, H, data):
        x1, x2 = sorted(data.draw(st.lists(st.integers(0, W), min_size=2, max_size=2, unique=True)))
        y1, y2 = sorted(data.draw(st.lists(st.integers(0, H), min_size=2, max_size=2, unique=True)))
        if max(x1, x2, y1, y2) <= 1:
            return  # already fractions
        fixed = repair_format(f"({x2}, {y2}, {x1}, {y1})", "box", (W, H))
        assert fixed == f"[{x1 / W:.4f}, {y1 / H:.4f}, {x2 / W:.4f}, {y2 / H:.4f}]"
        assert check_format(fixed, "box") is None and repair_format(fixed, "box", (W, H)) == fixed

    check()
    assert repair_format("[10, 20, 30, 40]", "box", None) is None  # pixels without the image size: unknowable
    assert repair_format("[10, 20, 3000, 40]", "box", (100, 100)) is None  # outside the image


# ---- planted defects in fresh samples of every generator ---------------------------------------


def wrong_answer(s):
    """A wrong final answer of the right form for `s`'s answer type."""
    a, kind = s.meta["answer"], s.meta["answer_type"]
    if kind == "number":
        return str(int(float(a)) * 2 + 7)
    if kind == "choice":
        return "A" if a != "A" else "B"
    if kind == "order":
        return ", ".join(reversed(a.split(", ")))
    if kind == "box":
        return "[0.0000, 0.0000, 0.0100, 0.0100]"
    return "second" if a != "second" else "first"


def answered(s, final, sid, meta_too=False):
    """`s` with its final answer replaced (any trace kept); with `meta_too` its meta says the same."""
    text = s.messages[1]["content"]
    head = text.rpartition("</think>\n\n")[0] + "</think>\n\n" if "</think>" in text else ""
    meta = {**s.meta, "answer": final} if meta_too else s.meta
    return replace(s, id=sid, messages=[s.messages[0], {"role": "assistant", "content": head + final}], meta=meta)


def test_planted_defects_of_every_generator_are_caught_and_no_clean_sample_is_dropped(tmp_path):
    clean, planted, conflicts = [], {}, []
    for k, (task, gen) in enumerate(GENERATORS.items()):
        s = gen.generate(3000 + k, "tiny")
        clean.append(s)
        text = s.messages[1]["content"]
        # a think answer with a second, unclosed <think>; a nothink answer with a think tag in it
        t = gen.generate(4000 + k, "tiny")
        if t.meta["mode"] == "think":
            bad = text_of(t).replace("</think>\n\n", "</think>\n\n<think>\n", 1)
        else:
            bad = text_of(t) + " </think>"
        planted[f"structure-{task}"] = replace(t, id=f"structure-{task}", messages=[t.messages[0], {"role": "assistant", "content": bad}])
        # a wrong answer whose metadata was rewritten to agree
        w = gen.generate(5000 + k, "tiny")
        planted[f"rewritten-{task}"] = answered(w, wrong_answer(w), f"rewritten-{task}", meta_too=True)
        # same image and question, another answer (meta rewritten too), seen before the clean one
        conflicts.append(answered(s, wrong_answer(s), f"conflict-{task}", meta_too=True))
        assert text  # every generator answers
    data = conflicts[: len(conflicts) // 2] + clean + conflicts[len(conflicts) // 2 :] + list(planted.values())
    report, kept = run(tmp_path, {"fresh": data})
    assert set(kept) == {s.id for s in clean}, sorted(set(kept) ^ {s.id for s in clean})
    removed = {json.loads(x)["id"]: json.loads(x)["reasons"] for x in (tmp_path / "out" / "removed.jsonl").read_text().splitlines()}
    for task, gen in GENERATORS.items():
        mode = "think" if gen.kind == "reasoning" else "nothink"
        assert removed[f"structure-{task}"] == ["repeated_think" if mode == "think" else "think_not_at_start"], task
        assert removed[f"rewritten-{task}"] == ["meta_answer_mismatch"], task


def text_of(s):
    return s.messages[1]["content"]


def test_conflicting_answers_are_settled_by_the_scene_never_by_order(tmp_path):
    s = GENERATORS["card_digit"].generate(11, "tiny")
    # a copy that says another digit, its meta rewritten, and no scene left to re-derive it from
    liar = answered(s, wrong_answer(s), "liar", meta_too=True)
    liar = replace(liar, meta={k: v for k, v in liar.meta.items() if k != "scene"})
    def run_in(name, datasets):
        (tmp_path / name).mkdir()
        return run(tmp_path / name, datasets)

    for order in ([liar, s], [s, liar]):
        _, kept = run_in(str(order[0].id), {"pair": order})
        assert set(kept) == {s.id}
    # neither side can be re-derived: both go, whatever the order
    honest = replace(s, id="honest", meta={k: v for k, v in s.meta.items() if k != "scene"})
    for order in ([liar, honest], [honest, liar]):
        report, kept = run_in(f"none-{order[0].id}", {"pair": order})
        assert kept == {} and report["datasets"]["pair"]["reasons"] == {"conflicting_answers": 2}
    # copies that agree are duplicates: one is kept
    _, kept = run_in("same", {"pair": [honest, s]})
    assert set(kept) == {s.id}


def test_think_structure():
    from phi4rv.data.verify import think_structure

    assert think_structure("<think>\nfirst 4, second 7\n4+7=11\n</think>\n\n11") is None
    assert think_structure("11") is None and think_structure("<|dummy_84|>11") is None
    assert think_structure("<think>\na\n</think>\n\n<think>\n11") == "repeated_think"
    assert think_structure("<think>\n<think>\na\n</think>\n\n11") == "repeated_think"
    assert think_structure("<think>\na\n</think>\n\nb\n</think>\n\n11") == "repeated_think"
    assert think_structure("<think>\na") == "unclosed_think"
    assert think_structure("<think>\na\n</think>\n\n") == "empty_answer"
    assert think_structure("11 <think>") == "think_not_at_start"
    assert think_structure("a\n</think>\n\n11") == "think_not_at_start"
