"""`phi4rv eval report`: tables, the paper's 4-benchmark average and Pareto plots — every figure
recomputed here straight from the records."""

import json

import numpy as np
import pytest
from PIL import Image
from test_eval_data import CORRECT, WRONG, build_all
from test_eval_http import backend, stub, teach  # noqa: F401  (stub is a fixture)

from phi4rv.cli import main
from phi4rv.eval.records import records_path
from phi4rv.eval.report import frontier
from phi4rv.eval.runner import RunConfig, run_eval
from phi4rv.eval.tasks import PAPER_AVERAGE, get_task

TASKS = [*PAPER_AVERAGE, "ai2d"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("report_bench"))


@pytest.fixture
def runs(stub, bench, tmp_path):  # noqa: F811
    """Two 'models' behind the stub: one right everywhere, one wrong on half the samples."""
    teach(stub, bench)
    good = RunConfig(out=tmp_path / "good", tasks=[get_task(t) for t in TASKS], modes=["auto", "nothink"],
                     data_dir=bench, label="good")
    run_eval(good, backend(stub))
    mixed = {t: {i: (CORRECT if n % 2 else WRONG)[t][i] for n, i in enumerate(CORRECT[t])} for t in CORRECT}
    teach(stub, bench, mixed)
    stub.delay = 0.01
    bad = RunConfig(out=tmp_path / "mixed", tasks=[get_task(t) for t in TASKS], modes=["nothink"], data_dir=bench,
                    label="mixed")
    run_eval(bad, backend(stub))
    return [good.out, bad.out]


def records(run_dir, task, mode):
    return [json.loads(x) for x in records_path(run_dir, task, mode).read_text().splitlines()]


def test_report_figures_are_recomputable_from_records(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", "report", *map(str, runs), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {(r["run"], r["task"], r["mode"]): r for r in report["rows"]}
    assert len(rows) == len(TASKS) * 3
    for run_dir, label, modes in ((runs[0], "good", ("auto", "nothink")), (runs[1], "mixed", ("nothink",))):
        for task in TASKS:
            for mode in modes:
                recs = records(run_dir, task, mode)
                row = rows[(label, task, mode)]
                totals = [r["times"]["total"] for r in recs]
                assert row["n"] == len(recs)
                assert row["accuracy"] == pytest.approx(100 * np.mean([r["score"] for r in recs]))
                assert row["latency_mean"] == pytest.approx(np.mean(totals))
                assert row["latency_p90"] == pytest.approx(np.percentile(totals, 90))
                assert row["ttft_mean"] == pytest.approx(np.mean([r["times"]["ttft"] for r in recs]))
                assert row["output_tokens_mean"] == pytest.approx(np.mean([r["tokens"]["output"] for r in recs]))
                assert row["unparsed"] == sum(r["parse"] != "ok" for r in recs)
    assert rows[("good", "chartqa", "auto")]["accuracy"] == 100.0
    assert rows[("mixed", "chartqa", "nothink")]["accuracy"] == 50.0
    avg = {(a["run"], a["mode"]): a for a in report["paper_average"]}
    assert set(avg) == {("good", "auto"), ("good", "nothink"), ("mixed", "nothink")}  # ai2d is not in the average
    for (label, mode), a in avg.items():
        four = [rows[(label, t, mode)] for t in PAPER_AVERAGE]
        assert a["accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in four]))
        assert a["latency_mean"] == pytest.approx(np.mean([r["latency_mean"] for r in four]))
        assert a["output_tokens_mean"] == pytest.approx(np.mean([r["output_tokens_mean"] for r in four]))
    screen = rows[("mixed", "screenspot_v2", "nothink")]["metrics"]
    assert {"platform_mean", "platform/desktop", "platform_type/web/icon"} <= set(screen)

    md = (out / "report.md").read_text()
    assert "| good | chartqa | auto | official | 4 | 100.0 | 0 | 0 | 0 |" in md and "## Paper average" in md
    for name in report["figures"]:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 500
    assert report["figures"][0] == "pareto.png" and "pareto_ai2d.png" in report["figures"]
    assert "pareto.png" in capsys.readouterr().out


def test_failed_and_missing_samples_count_as_wrong(runs, tmp_path):
    """A failed query stays in the denominator as a wrong answer and an error; a selected sample
    without a record (an interrupted run) is wrong and missing."""
    path = records_path(runs[0], "ai2d", "nothink")
    recs = records(runs[0], "ai2d", "nothink")  # the 'good' run: both right
    assert [r["score"] for r in recs] == [1.0, 1.0]
    recs[0].update(parse="error", error="HTTP 400: image could not be decoded", score=0.0)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["eval", "report", str(runs[0]), "--out", str(tmp_path / "r")]) == 0
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    row = next(r for r in rows if (r["task"], r["mode"]) == ("ai2d", "nothink"))
    assert (row["n"], row["errors"], row["missing"], row["accuracy"]) == (2, 1, 0, 50.0)
    assert "retry the errors" in (tmp_path / "r" / "report.md").read_text()

    path.write_text(json.dumps(recs[1]) + "\n")  # the other record lost
    assert main(["eval", "report", str(runs[0]), "--out", str(tmp_path / "r2")]) == 0
    rows = json.loads((tmp_path / "r2" / "report.json").read_text())["rows"]
    row = next(r for r in rows if (r["task"], r["mode"]) == ("ai2d", "nothink"))
    assert (row["n"], row["errors"], row["missing"], row["accuracy"]) == (2, 0, 1, 50.0)


def test_a_run_recorded_before_rules_existed_reports_lenient(runs, tmp_path):
    run = json.loads((runs[0] / "run.json").read_text())
    assert run["tasks"]["chartqa"]["rules"] == "official" and run["samples"]["chartqa"] == 4
    for spec in run["tasks"].values():
        spec.pop("rules", None)
    (runs[0] / "run.json").write_text(json.dumps(run))
    assert main(["eval", "report", str(runs[0]), "--out", str(tmp_path / "r")]) == 0
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    assert {r["rules"] for r in rows} == {"lenient"}


def test_frontier():
    pts = [(1, 50), (2, 60), (3, 55), (0.5, 40), (2, 70), (4, 70)]
    assert frontier(pts) == [3, 0, 4]  # (2, 60) and (3, 55) are beaten by (2, 70); (4, 70) adds nothing
    assert frontier([]) == []


def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", "report", str(tmp_path), "--out", str(tmp_path / "r")]) == 1
    assert "is not an eval run" in capsys.readouterr().err
