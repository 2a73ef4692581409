"""Small copies of each benchmark in its official file layout (built here, nothing downloaded), the
loaders that read them, and the scorers end to end through `phi4rv eval score`.

The builders are imported by the other eval tests; `CORRECT` and `WRONG` hold, per task, a raw
output for every sample id that must score 1 / 0.
"""

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from phi4rv.cli import main
from phi4rv.data.formats import Sample, write_parquet
from phi4rv.eval.runner import load_task
from phi4rv.eval.tasks import get_task

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(w: int = 64, h: int = 48, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def hf_image(w=64, h=48, color=(200, 30, 30), name="img.png") -> dict:
    return {"bytes": png(w, h, color), "path": name}


def write_table(rows: list[dict], path: Path, types: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    arrays = {k: pa.array(v, type=(types or {}).get(k)) for k, v in cols.items()}
    pq.write_table(pa.table(arrays), path)


# ---- builders, one per benchmark ---------------------------------------------------------------


def build_chartqa(root: Path) -> None:
    """lmms-lab/ChartQA: data/test-*.parquet with type, question, answer, image."""
    rows = [
        {"type": "human_test", "question": "How many units were sold in 2019?", "answer": "1000"},
        {"type": "augmented_test", "question": "What share of votes went to Red?", "answer": "0.45"},
        {"type": "human_test", "question": "Which year had the most rainfall?", "answer": "2008"},
        {"type": "augmented_test", "question": "Which colour is the tallest bar?", "answer": "Blue"},
    ]
    for i, r in enumerate(rows):
        r["image"] = hf_image(color=(10 * i, 100, 100))
    write_table(rows[:2], root / "chartqa/data/test-00000-of-00002.parquet", {"image": IMAGE})
    write_table(rows[2:], root / "chartqa/data/test-00001-of-00002.parquet", {"image": IMAGE})


def build_mathvista(root: Path) -> None:
    """AI4Math/MathVista: data/testmini-*.parquet; `image` is a path, `decoded_image` the bytes."""
    base = {"unit": None, "metadata": {"category": "math-targeted-vqa", "task": "geometry problem solving"}}
    rows = [
        {"pid": "1", "question": "How long is the side?", "choices": ["3 cm", "5 cm", "7 cm"], "precision": None,
         "answer": "5 cm", "question_type": "multi_choice", "answer_type": "text"},
        {"pid": "2", "question": "How many people attended?", "choices": None, "precision": None,
         "answer": "1000", "question_type": "free_form", "answer_type": "integer"},
        {"pid": "3", "question": "What is the slope?", "choices": None, "precision": 2.0,
         "answer": "1.45", "question_type": "free_form", "answer_type": "float"},
        {"pid": "4", "question": "List the first three terms.", "choices": None, "precision": None,
         "answer": "[1, 2, 3]", "question_type": "free_form", "answer_type": "list"},
    ]
    for r in rows:
        r.update(base)
        r["image"] = f"images/{r['pid']}.jpg"
        r["decoded_image"] = hf_image(name=r["image"])
        hint = "Hint: Please answer the question and provide the final answer at the end."
        choices = ("\nChoices:\n" + "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(r["choices"]))) if r["choices"] else ""
        r["query"] = f"{hint}\nQuestion: {r['question']}{choices}"
    write_table(rows, root / "mathvista/data/testmini-00000-of-00001-5b4ba1e6.parquet",
                {"decoded_image": IMAGE, "choices": pa.list_(pa.string()), "precision": pa.float64(),
                 "unit": pa.string()})


def build_mmmu(root: Path) -> None:
    """MMMU/MMMU: <Subject>/validation-*.parquet; options is a string holding a Python list."""
    images = {f"image_{k}": None for k in range(1, 8)}
    art = [{
        "id": "validation_Art_1", "question": "Which painting is shown in <image 1>?",
        "options": "['Mona Lisa', 'The Scream', 'Starry Night', 'Guernica']", "answer": "B",
        "explanation": "", **images, "image_1": hf_image(color=(1, 2, 3)), "img_type": "['Paintings']",
        "question_type": "multiple-choice", "subfield": "Art History", "topic_difficulty": "Easy",
    }]
    math = [{
        "id": "validation_Math_1",
        "question": "<image 2> shows the triangle and <image 1> the legend. What is x? Use <image 2>.",
        "options": "[]", "answer": "12", "explanation": "", **images,
        "image_1": hf_image(color=(0, 0, 255)), "image_2": hf_image(color=(0, 255, 0)),
        "img_type": "['Diagrams']", "question_type": "open", "subfield": "Geometry", "topic_difficulty": "Medium",
    }]
    types = {f"image_{k}": IMAGE for k in range(1, 8)}
    write_table(art, root / "mmmu/Art/validation-00000-of-00001.parquet", types)
    write_table(math, root / "mmmu/Math/validation-00000-of-00001.parquet", types)


SCREEN = {"desktop": (200, 100), "mobile": (100, 200), "web": (300, 150)}


def build_screenspot(root: Path) -> None:
    """OS-Copilot/ScreenSpot-v2: screenspot_<platform>_v2.json, bbox = pixels [x, y, w, h]."""
    d = root / "screenspot_v2"
    (d / "screenspotv2_image").mkdir(parents=True)
    for platform, (w, h) in SCREEN.items():
        name = f"{platform}_0.png"
        (d / "screenspotv2_image" / name).write_bytes(png(w, h, (240, 240, 240)))
        rows = [
            {"img_filename": name, "bbox": [w * 0.25, h * 0.2, w * 0.2, h * 0.3], "instruction": f"open the {platform} menu",
             "data_type": "text", "data_source": "macos"},
            {"img_filename": name, "bbox": [w * 0.6, h * 0.6, w * 0.1, h * 0.1], "instruction": f"close the {platform} window",
             "data_type": "icon", "data_source": "macos"},
        ]
        (d / f"screenspot_{platform}_v2.json").write_text(json.dumps(rows))


def build_ai2d(root: Path) -> None:
    """lmms-lab/ai2d: data/test-*.parquet; answer is the 0-based index as a string."""
    rows = [
        {"question": "Which stage comes after the egg?", "options": ["adult", "larva", "pupa", "egg"], "answer": "1",
         "image": hf_image()},
        {"question": "What eats the grass?", "options": ["hawk", "snake", "rabbit", "sun"], "answer": "2",
         "image": hf_image(color=(0, 200, 0))},
    ]
    write_table(rows, root / "ai2d/data/test-00000-of-00001.parquet", {"image": IMAGE})


def build_ocrbench(root: Path) -> None:
    """echo840/OCRBench: data/test-*.parquet; answer is a list of strings."""
    rows = [
        {"dataset": "IIIT5K", "question": "what is written in the image?", "question_type": "Regular Text Recognition",
         "answer": ["STOP"], "image": hf_image()},
        {"dataset": "HME100k", "question": "Write out the expression in the image in LaTeX format.",
         "question_type": "Handwritten Mathematical Expression Recognition", "answer": ["x^{2}+1"], "image": hf_image()},
    ]
    write_table(rows, root / "ocrbench/data/test-00000-of-00001.parquet", {"image": IMAGE})


def synthetic_samples() -> list[Sample]:
    def s(i, question, answer, answer_type, **meta):
        return Sample(
            id=f"syn-{i}",
            messages=[{"role": "user", "content": "<image>\n" + question}, {"role": "assistant", "content": answer}],
            images=[png(32, 32, (i * 20, 0, 0))],
            meta={"task": meta.pop("task", "chart_value"), "kind": meta.pop("kind", "perception"), "mode": "nothink",
                  "answer": answer, "answer_type": answer_type, "scene": {}, "seed": 10**9 + i, **meta},
        )

    return [
        s(0, "What is the value of the red bar?", "13", "number"),
        s(1, "Read the value off the axis.", "40", "number", tolerance={"abs": 2.5}),
        s(2, "Which shape is left of the circle?\nA. square\nB. triangle\nC. star", "B", "choice",
          task="shape_choice", choices=["square", "triangle", "star"]),
        s(3, "Where is the OK button?", "[0.2000, 0.3000, 0.4000, 0.5000]", "box", task="ui_box"),
        s(4, "Put the frames in order.", "3, 1, 2", "order", task="frame_order", kind="reasoning"),
        s(5, "What word is written?", "Maple", "text", task="ocr_word"),
    ]


def build_synthetic(root: Path) -> None:
    (root / "synthetic").mkdir(parents=True)
    write_parquet(synthetic_samples(), root / "synthetic" / "shard-00000.parquet")


BUILDERS = {
    "chartqa": build_chartqa, "mathvista": build_mathvista, "mmmu": build_mmmu, "screenspot_v2": build_screenspot,
    "ai2d": build_ai2d, "ocrbench": build_ocrbench, "synthetic": build_synthetic,
}


def build_all(root: Path) -> Path:
    for b in BUILDERS.values():
        b(root)
    return root


# Raw outputs per task and sample id that must score 1 (CORRECT) and 0 while parsed (WRONG) under
# both rule sets; LENIENT_ONLY: outputs only `--rules lenient` accepts (the official scorers don't).
CORRECT = {
    "chartqa": {"0": "1000", "1": "45%", "2": "<think>the tallest is 2008? no</think>2010", "3": "blue"},
    "mathvista": {"1": "<think>B or C</think>(B) 5 cm", "2": "There were 1,000 people.", "3": "The slope is 1.449",
                  "4": "[1, 2, 3]"},
    "mmmu": {"validation_Art_1": "The answer is (B).", "validation_Math_1": "Therefore x = 12."},
    "screenspot_v2": {"desktop-0": "[0.25, 0.2, 0.45, 0.5]", "desktop-1": "(0.65, 0.65)",
                      "mobile-0": "<think>top left</think>[0.3, 0.3, 0.4, 0.4]", "mobile-1": "[0.6, 0.6, 0.7, 0.7]",
                      "web-0": "[0.35, 0.35]", "web-1": "[0.62, 0.61, 0.68, 0.69]"},
    "ai2d": {"0": "B", "1": "C. rabbit"},
    "ocrbench": {"0": "The sign reads Stop.", "1": "x ^ { 2 } + 1"},
    "synthetic": {"syn-0": "13", "syn-1": "About 42.", "syn-2": "(B)", "syn-3": "[0.21, 0.31, 0.41, 0.51]",
                  "syn-4": "3,1,2", "syn-5": "maple"},
}
WRONG = {
    "chartqa": {"0": "1200", "1": "45", "2": "2200", "3": "Light blue"},
    "mathvista": {"1": "(C)", "2": "999", "3": "1.5", "4": "[1, 3, 2]"},
    "mmmu": {"validation_Art_1": "A", "validation_Math_1": "x = 13"},
    "screenspot_v2": {"desktop-0": "[0.9, 0.9, 1.0, 1.0]", "desktop-1": "[0.0, 0.0, 0.1, 0.1]",
                      "mobile-0": "[0.8, 0.8]", "mobile-1": "[0.1, 0.1, 0.2, 0.2]",
                      "web-0": "[0.0, 0.9, 0.1, 1.0]", "web-1": "(0.5, 0.5)"},
    "ai2d": {"0": "A.", "1": "(D)"},
    "ocrbench": {"0": "GO", "1": "X^{2}+1"},
    "synthetic": {"syn-0": "12", "syn-1": "45", "syn-2": "C", "syn-3": "[0.6, 0.6, 0.7, 0.7]", "syn-4": "1, 2, 3",
                  "syn-5": "Oak"},
}


LENIENT_ONLY = {
    "chartqa": {"0": "1,000", "2": "The answer is 2008.", "3": "blue."},
    "mathvista": {"4": "The terms are 1, 2 and 3."},
    "ai2d": {"0": "The answer is B", "1": "I pick (C) rabbit."},
}
OFFICIAL_ONLY = {
    "mathvista": {"1": "5"},  # the nearest option at any distance ("5 cm"); lenient wants it within half its length
    "screenspot_v2": {"web-1": "[0.68, 0.69, 0.62, 0.61]"},  # an inverted box: official takes its centre
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return build_all(tmp_path_factory.mktemp("bench"))


# ---- loaders -----------------------------------------------------------------------------------


def test_every_task_loads_its_official_layout(bench):
    for name in BUILDERS:
        samples = load_task(get_task(name), bench)
        assert {s.id for s in samples} == set(CORRECT[name]), name
        for s in samples:
            n_tags = sum(m["content"].count("<image>") for m in s.messages)
            assert n_tags == len(s.images) >= 1, (name, s.id)
            assert s.messages[-1]["role"] == "user"


def test_prompts_follow_the_harness_conventions(bench):
    chart = load_task(get_task("chartqa"), bench)
    assert chart[0].messages[0]["content"] == "<image>\nHow many units were sold in 2019?\nAnswer the question with a single word."
    assert [s.groups["type"] for s in chart] == ["human_test", "augmented_test", "human_test", "augmented_test"]
    ai2d = load_task(get_task("ai2d"), bench)[0]
    assert ai2d.messages[0]["content"].endswith(
        "egg?\nA. adult\nB. larva\nC. pupa\nD. egg\nAnswer with the option's letter from the given choices directly.")
    assert ai2d.target == "B"  # answer "1" is 0-based
    vista = {s.id: s for s in load_task(get_task("mathvista"), bench)}
    assert vista["1"].messages[0]["content"].startswith("<image>\nHint: Please answer")  # the official query
    assert vista["3"].info["precision"] == 2 and isinstance(vista["3"].info["precision"], int)


def test_mmmu_images_in_order_of_first_mention(bench):
    mmmu = {s.id: s for s in load_task(get_task("mmmu"), bench)}
    open_q = mmmu["validation_Math_1"]
    # <image 2> is mentioned first: it goes first; each image once although mentioned twice
    assert len(open_q.images) == 2
    assert Image.open(io.BytesIO(open_q.images[0])).getpixel((0, 0)) == (0, 255, 0)
    assert open_q.messages[0]["content"].startswith("<image>\n<image>\n<image 2> shows")
    assert open_q.groups == {"subject": "Math", "question_type": "open"}
    mc = mmmu["validation_Art_1"]
    assert "A. Mona Lisa\nB. The Scream" in mc.messages[0]["content"]


def test_chartqa_huggingfacem4_layout(tmp_path):
    rows = [{"query": "What is the total?", "label": ["1,000"], "human_or_machine": 1, "image": hf_image()}]
    write_table(rows, tmp_path / "chartqa/test-00000-of-00001.parquet", {"image": IMAGE})
    task = get_task("chartqa")
    [s] = load_task(task, tmp_path)
    assert s.groups == {"type": "augmented_test"} and s.target == ["1,000"]
    assert task.score(s, "1,000").score == 1.0
    assert task.score(s, "1000").score == 0.0  # official: float("1,000") does not read, and the strings differ
    assert get_task("chartqa", rules="lenient").score(s, "1000").score == 1.0


def test_screenspot_reads_image_sizes_and_pixel_boxes(bench):
    samples = {s.id: s for s in load_task(get_task("screenspot_v2"), bench)}
    s = samples["mobile-0"]
    assert (s.info["width"], s.info["height"]) == (100, 200)
    assert s.target == [25.0, 40.0, 20.0, 60.0]
    assert "between 0.0000 and 1.0000" in s.messages[0]["content"]
    pixel = {x.id: x for x in load_task(get_task("screenspot_v2", coords="pixel"), bench)}
    assert "100x200" in pixel["mobile-0"].messages[0]["content"]
    assert get_task("screenspot_v2", coords="pixel").score(pixel["mobile-0"], "[30, 50, 40, 70]").score == 1.0


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no data for task 'chartqa'"):
        load_task(get_task("chartqa"), tmp_path)
    (tmp_path / "ai2d").mkdir()
    with pytest.raises(ValueError, match="no 'test' Parquet files"):
        load_task(get_task("ai2d"), tmp_path)


# ---- scoring through `phi4rv eval score` -------------------------------------------------------


def _score(bench, tmp_path, capsys, task, outputs, *extra):
    preds = tmp_path / f"{task}.jsonl"
    preds.write_text("".join(json.dumps({"id": i, "output": o}) + "\n" for i, o in outputs.items()))
    out = tmp_path / f"{task}_scored.jsonl"
    assert main(["eval", "score", "--task", task, "--predictions", str(preds), "--data-dir", str(bench),
                 "--out", str(out), *extra]) == 0
    return json.loads(capsys.readouterr().out), [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("rules", ["official", "lenient"])
@pytest.mark.parametrize("task", list(BUILDERS))
def test_correct_outputs_score_full_marks(bench, tmp_path, capsys, task, rules):
    metrics, rows = _score(bench, tmp_path, capsys, task, CORRECT[task], "--rules", rules)
    bad = [(r["id"], r["answer"], r["prediction"]) for r in rows if r["score"] != 1.0]
    assert not bad
    assert metrics["accuracy"] == 100.0 and metrics["unparsed"] == 0 and metrics["missing"] == 0
    assert metrics["rules"] == (None if task == "synthetic" else rules)


@pytest.mark.parametrize("rules", ["official", "lenient"])
@pytest.mark.parametrize("task", list(BUILDERS))
def test_wrong_outputs_score_zero_but_parse(bench, tmp_path, capsys, task, rules):
    metrics, rows = _score(bench, tmp_path, capsys, task, WRONG[task], "--rules", rules)
    assert [r["id"] for r in rows if r["score"] != 0.0] == []
    assert [r["id"] for r in rows if r["parse"] != "ok"] == []
    assert metrics["accuracy"] == 0.0


@pytest.mark.parametrize("task", list(LENIENT_ONLY))
def test_lenient_rules_accept_what_the_official_scorers_do_not(bench, tmp_path, capsys, task):
    _, rows = _score(bench, tmp_path, capsys, task, LENIENT_ONLY[task], "--rules", "lenient", "--allow-missing")
    assert [r["score"] for r in rows] == [1.0] * len(LENIENT_ONLY[task])
    _, rows = _score(bench, tmp_path, capsys, task, LENIENT_ONLY[task], "--allow-missing")
    assert [r["score"] for r in rows] == [0.0] * len(LENIENT_ONLY[task])


@pytest.mark.parametrize("task", list(OFFICIAL_ONLY))
def test_official_rules_accept_what_the_lenient_ones_refuse(bench, tmp_path, capsys, task):
    _, rows = _score(bench, tmp_path, capsys, task, OFFICIAL_ONLY[task], "--allow-missing")
    assert [r["score"] for r in rows] == [1.0] * len(OFFICIAL_ONLY[task])
    _, rows = _score(bench, tmp_path, capsys, task, OFFICIAL_ONLY[task], "--rules", "lenient", "--allow-missing")
    assert [(r["score"], r["parse"]) for r in rows] == [(0.0, "unparsed")] * len(OFFICIAL_ONLY[task])


def test_every_sample_counts_in_eval_score(bench, tmp_path, capsys):
    """A missing prediction is wrong unless --allow-missing; a failed query is wrong and an error."""
    outputs = {"0": "B"}  # 1 of 2 ai2d samples, right
    metrics, rows = _score(bench, tmp_path, capsys, "ai2d", outputs)
    assert (metrics["n"], metrics["missing"], metrics["accuracy"]) == (2, 1, 50.0)
    assert [r["parse"] for r in rows] == ["ok", "missing"]
    metrics, _ = _score(bench, tmp_path, capsys, "ai2d", outputs, "--allow-missing")
    assert (metrics["n"], metrics["missing"], metrics["accuracy"]) == (1, 1, 100.0)
    preds = tmp_path / "failed.jsonl"
    preds.write_text(json.dumps({"id": "0", "output": "B"}) + "\n" + json.dumps({"id": "1", "error": "HTTP 400"}) + "\n")
    assert main(["eval", "score", "--task", "ai2d", "--predictions", str(preds), "--data-dir", str(bench)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert (metrics["n"], metrics["errors"], metrics["missing"], metrics["accuracy"]) == (2, 1, 0, 50.0)


@pytest.mark.parametrize("rules", ["official", "lenient"])
def test_unparsed_answers_are_counted(bench, tmp_path, capsys, rules):
    outputs = {"validation_Art_1": "<think>It is clearly (B) The Scream", "validation_Math_1": ""}
    metrics, rows = _score(bench, tmp_path, capsys, "mmmu", outputs, "--rules", rules)
    assert metrics["unparsed"] == 2 and metrics["accuracy"] == 0.0
    assert rows[0]["parse"] == "no_answer" and rows[0]["answer"] is None
    metrics, rows = _score(bench, tmp_path, capsys, "ai2d", {"0": "I am not sure.", "1": "<think>C</think>"},
                           "--rules", rules)
    assert [r["parse"] for r in rows] == ["unparsed", "no_answer"] and metrics["accuracy"] == 0.0


def test_mmmu_official_guesses_a_seeded_letter_and_counts_it_unparsed(bench, tmp_path, capsys):
    """The official MMMU parser picks a random option when nothing parses; the draw is seeded per
    sample (the same letter every time) and the record still says unparsed."""
    outputs = {"validation_Art_1": "I cannot tell.", "validation_Math_1": "12"}
    first, rows = _score(bench, tmp_path, capsys, "mmmu", outputs)
    assert rows[0]["parse"] == "unparsed" and rows[0]["prediction"] in "ABCD" and first["unparsed"] == 1
    assert rows[0]["score"] == float(rows[0]["prediction"] == "B")
    again, rows2 = _score(bench, tmp_path, capsys, "mmmu", outputs)
    assert rows2[0]["prediction"] == rows[0]["prediction"] and again == first
    _, rows = _score(bench, tmp_path, capsys, "mmmu", outputs, "--rules", "lenient")
    assert rows[0]["parse"] == "unparsed" and rows[0]["score"] == 0.0 and rows[0]["prediction"] is None


def test_screenspot_pixel_answers_miss_under_the_fraction_convention(bench, tmp_path, capsys):
    outputs = {"desktop-0": "[60, 25, 80, 45]"}  # inside the target in pixels, but the contract is fractions
    metrics, rows = _score(bench, tmp_path, capsys, "screenspot_v2", outputs, "--rules", "lenient")
    assert rows[0]["parse"] == "unparsed" and metrics["missing"] == 5
    metrics, rows = _score(bench, tmp_path, capsys, "screenspot_v2", outputs)  # official: off the image, a miss
    assert rows[0]["parse"] == "ok" and rows[0]["score"] == 0.0
    metrics, rows = _score(bench, tmp_path, capsys, "screenspot_v2", outputs, "--coords", "pixel")
    assert rows[0]["score"] == 1.0
    metrics, rows = _score(bench, tmp_path, capsys, "screenspot_v2", {"desktop-0": "[300, 250, 400, 450]"},
                           "--coords", "thousand")
    assert rows[0]["score"] == 1.0


def test_screenspot_reports_platform_means(bench, tmp_path, capsys):
    outputs = {**CORRECT["screenspot_v2"], "mobile-0": "[0.9, 0.9, 1.0, 1.0]", "web-0": "[0.9, 0.9, 1.0, 1.0]",
               "web-1": "[0.9, 0.9, 1.0, 1.0]"}
    metrics, _ = _score(bench, tmp_path, capsys, "screenspot_v2", outputs)
    assert metrics["platform/desktop"] == 100.0 and metrics["platform/mobile"] == 50.0 and metrics["platform/web"] == 0.0
    assert metrics["platform_mean"] == 50.0 and metrics["sample_mean"] == 50.0
    assert metrics["platform_type/mobile/icon"] == 100.0 and metrics["type/text"] == pytest.approx(100 / 3, abs=1e-3)
    assert metrics["accuracy"] == metrics["column_mean"] == 50.0  # official: the macro average of the 6 columns


def test_screenspot_official_accuracy_is_the_macro_average_of_the_six_columns(bench, tmp_path, capsys):
    # the extra desktop/text rows make the sample mean and the column mean differ
    d = tmp_path / "ss"
    import shutil
    shutil.copytree(bench / "screenspot_v2", d / "screenspot_v2")
    rows = json.loads((d / "screenspot_v2/screenspot_desktop_v2.json").read_text())
    rows += [dict(rows[0]) for _ in range(2)]
    (d / "screenspot_v2/screenspot_desktop_v2.json").write_text(json.dumps(rows))
    outputs = {"desktop-0": "[0.3, 0.3]", "desktop-2": "[0.3, 0.3]", "desktop-3": "[0.3, 0.3]",  # desktop/text 3/3
               "desktop-1": "[0, 0]", "mobile-0": "[0, 0]", "mobile-1": "[0, 0]", "web-0": "[0, 0]", "web-1": "[0, 0]"}
    official, _ = _score(d, tmp_path, capsys, "screenspot_v2", outputs)
    lenient, _ = _score(d, tmp_path, capsys, "screenspot_v2", outputs, "--rules", "lenient")
    assert official["accuracy"] == pytest.approx(100 / 6, abs=1e-3)
    assert official["sample_mean"] == pytest.approx(300 / 8, abs=1e-3)
    assert lenient["accuracy"] == pytest.approx(300 / 8, abs=1e-3)


def test_score_rejects_unknown_ids(bench, tmp_path, capsys):
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "nope", "output": "B"}) + "\n")
    assert main(["eval", "score", "--task", "ai2d", "--predictions", str(preds), "--data-dir", str(bench)]) == 1
    assert "'nope' is not a ai2d sample" in capsys.readouterr().err


def test_synthetic_generates_held_out_samples_when_no_data_folder(tmp_path):
    import phi4rv.data.synth as synth
    from phi4rv.eval.tasks.synthetic import HELD_OUT_SEED_BASE
    from phi4rv.processing.reasoning import parse_completion

    task = get_task("synthetic", per_generator=1, difficulty="tiny")
    samples = load_task(task, tmp_path)  # no synthetic/ folder: generated
    assert len(samples) == len(synth.GENERATORS)
    assert {s.groups["task"] for s in samples} == set(synth.GENERATORS)
    for s in samples:
        assert s.id.endswith(f"-{HELD_OUT_SEED_BASE}") and s.messages[-1]["role"] == "user" and s.images
    # the generators' own reference answers (with their think traces) score full marks
    for name, gen in synth.GENERATORS.items():
        ref = gen.generate(HELD_OUT_SEED_BASE, "tiny")
        sample = next(s for s in samples if s.groups["task"] == name)
        answer = parse_completion(ref.messages[-1]["content"], "auto").answer
        assert task.score(sample, answer).score == 1.0, name


@pytest.mark.parametrize("args,message", [
    (["--tasks", "chartqa,nope"], "unknown task 'nope'"),
    (["--modes", "fast"], "unknown mode 'fast'"),
    (["--endpoint", "http://127.0.0.1:9/v1"], "--endpoint needs --served-model"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--data", "chartqa"], "--data takes TASK=PATH"),
])
def test_run_argument_errors_are_one_line(tmp_path, capsys, args, message):
    base = ["eval", "run", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path)]
    if "--endpoint" not in args:
        base += ["--model", str(tmp_path)]
    assert main(base + args) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_tasks_lists_every_task_with_its_version(capsys):
    assert main(["eval", "tasks"]) == 0
    out = capsys.readouterr().out
    for name in BUILDERS:
        assert f"{name} " in out
    assert "screenspot_v2  v2 *" in out and "--rules official" in out
