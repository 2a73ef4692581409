"""`phi4rv eval report`: tables, the paper's 4-benchmark average and Pareto plots, from records only.

Per run × task × mode: accuracy (the task's main metric, %, over every sample of the run: a
sample whose query failed — `parse == "error"`: an image that did not load, an HTTP error, a
timeout after retries — or that has no record at all is wrong), the scoring rules used, the
task's own breakdown, n (samples in the denominator), unparsed count (answers nothing could be
read from, plus reasoning that never closed), errors, missing, mean and p90 latency
(`times.total`, numpy's linear percentile, over the samples that ran), mean time to first
token, mean output tokens (thinking + answer), and the share of answers given in think mode. The paper's average (ChartQA, MathVista, MMMU, ScreenSpot-v2) is the
plain mean of the four tasks' accuracies, mean latencies and mean output tokens. Pareto plots put
every run × mode on accuracy vs mean time and vs mean output tokens and draw the frontier.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from phi4rv.eval.records import read_records, read_run, records_path
from phi4rv.eval.tasks import PAPER_AVERAGE, TASKS
from phi4rv.eval.tasks.base import EvalError, Task


@dataclass
class Row:
    run: str
    task: str
    mode: str
    n: int  # every sample of the run: scored + errors + missing
    accuracy: float
    unparsed: int
    errors: int
    latency_mean: float | None
    latency_p90: float | None
    ttft_mean: float | None
    output_tokens_mean: float | None
    thinking_tokens_mean: float | None
    think_share: float | None  # % of answers given in think mode
    metrics: dict[str, float] = field(default_factory=dict)
    missing: int = 0  # samples the run selected that have no record (an interrupted run)
    rules: str = "-"  # "official" | "lenient" ("-": a task with one rule)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarise(task: Task, run: str, mode: str, records: list[dict], expected: int | None = None) -> Row:
    """One row; `expected`: how many samples the run selected (records short of it are missing,
    and count as wrong)."""
    scored = [r for r in records if r["parse"] != "error"]
    missing = max(0, expected - len(records)) if expected is not None else 0
    counted = [*records, *({"score": 0.0, "groups": {}} for _ in range(missing))]
    metrics = task.metrics(counted) if counted else {"accuracy": float("nan")}
    totals = [r["times"].get("total") for r in scored if r.get("times")]
    totals = [t for t in totals if t is not None]
    return Row(
        run=run,
        task=task.name,
        mode=mode,
        n=len(counted),
        accuracy=metrics["accuracy"],
        unparsed=sum(r["parse"] in ("unparsed", "no_answer") for r in scored),
        errors=len(records) - len(scored),
        latency_mean=_mean(totals),
        latency_p90=float(np.percentile(totals, 90)) if totals else None,
        ttft_mean=_mean([(r.get("times") or {}).get("ttft") for r in scored]),
        output_tokens_mean=_mean([(r.get("tokens") or {}).get("output") for r in scored]),
        thinking_tokens_mean=_mean([(r.get("tokens") or {}).get("thinking") for r in scored]),
        think_share=100.0 * sum(r["answered_mode"] == "think" for r in scored) / len(scored) if scored else None,
        metrics={k: v for k, v in metrics.items() if k != "accuracy"},
        missing=missing,
        rules=task.rules if task.has_rules else "-",
    )


def load_rows(run_dirs: Sequence[Path]) -> list[Row]:
    rows, labels = [], set()
    for run_dir in run_dirs:
        run = read_run(run_dir)
        label = run.get("label") or Path(run_dir).name
        if label in labels:
            label = f"{label} ({Path(run_dir).name})"
        labels.add(label)
        for name, spec in run["tasks"].items():
            if name not in TASKS:
                raise EvalError(f"{run_dir}: unknown task {name!r} in run.json")
            options = {k: v for k, v in spec.items() if k not in ("version", "judge")}
            if TASKS[name].has_rules and "rules" not in options:
                options["rules"] = "lenient"  # recorded before official rules existed: scored leniently
            task = TASKS[name](**options)
            expected = (run.get("samples") or {}).get(name)
            for mode in run["modes"]:
                records = list(read_records(records_path(run_dir, name, mode)).values())
                if records:
                    rows.append(summarise(task, label, mode, records, expected))
    return rows


def paper_average(rows: list[Row]) -> list[dict]:
    """Per run × mode with all four of the paper's tasks: the plain mean of their figures."""
    out = []
    for run, mode in dict.fromkeys((r.run, r.mode) for r in rows):
        four = {r.task: r for r in rows if r.run == run and r.mode == mode and r.task in PAPER_AVERAGE}
        if len(four) < len(PAPER_AVERAGE):
            continue
        rs = [four[t] for t in PAPER_AVERAGE]
        out.append({
            "run": run,
            "mode": mode,
            "accuracy": float(np.mean([r.accuracy for r in rs])),
            "latency_mean": _mean_all([r.latency_mean for r in rs]),
            "output_tokens_mean": _mean_all([r.output_tokens_mean for r in rs]),
            "n": sum(r.n for r in rs),
        })
    return out


def _mean_all(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


# ---- Pareto -----------------------------------------------------------------------------------


def frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (lower cost x and higher accuracy y), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    keep, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            keep.append(i)
            best = points[i][1]
    return keep


def plot_pareto(entries: list[dict], title: str, path: Path) -> None:
    """Accuracy vs mean time and vs mean output tokens, one point per run × mode (colour: run,
    marker: mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {run: f"C{i % 10}" for i, run in enumerate(dict.fromkeys(e["run"] for e in entries))}
    markers = {"auto": "o", "think": "^", "nothink": "s"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, xlabel in ((axes[0], "latency_mean", "mean response time (s)"),
                            (axes[1], "output_tokens_mean", "mean output tokens")):
        pts = [e for e in entries if e.get(key) is not None and not math.isnan(e["accuracy"])]
        xy = [(e[key], e["accuracy"]) for e in pts]
        for e, (x, y) in zip(pts, xy):
            ax.scatter(x, y, s=36, color=colors[e["run"]], marker=markers.get(e["mode"], "o"))
            ax.annotate(f"{e['run']} · {e['mode']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = [xy[i] for i in frontier(xy)]
        if front:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", lw=1, ls="--",
                    label="Pareto frontier")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- output -----------------------------------------------------------------------------------


def _f(v: float | None, digits: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def to_markdown(rows: list[Row], average: list[dict], figures: list[str]) -> str:
    lines = ["# Evaluation report", "",
             "| run | task | mode | rules | n | accuracy % | unparsed | errors | missing | mean s | p90 s | TTFT s "
             "| out tok | think tok | think % |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.run} | {r.task} | {r.mode} | {r.rules} | {r.n} | {_f(r.accuracy)} | {r.unparsed} | "
                     f"{r.errors} | {r.missing} | "
                     f"{_f(r.latency_mean, 3)} | {_f(r.latency_p90, 3)} | {_f(r.ttft_mean, 3)} | "
                     f"{_f(r.output_tokens_mean)} | {_f(r.thinking_tokens_mean)} | {_f(r.think_share, 0)} |")
    if average:
        lines += ["", f"## Paper average ({', '.join(PAPER_AVERAGE)})", "",
                  "| run | mode | accuracy % | mean s | out tok |", "|---|---|---:|---:|---:|"]
        for a in average:
            lines.append(f"| {a['run']} | {a['mode']} | {_f(a['accuracy'])} | {_f(a['latency_mean'], 3)} | "
                         f"{_f(a['output_tokens_mean'])} |")
    detailed = [r for r in rows if r.metrics]
    if detailed:
        lines += ["", "## Breakdowns", ""]
        for r in detailed:
            parts = ", ".join(f"{k} {_f(v)}" for k, v in r.metrics.items())
            lines.append(f"- **{r.run} · {r.task} · {r.mode}**: {parts}")
    lines += ["", "Every sample counts: accuracy is over n, and a sample with an error (it never got an answer) "
              "or without a record (missing) is wrong. Rules: `official` follows each benchmark's own scorer, "
              "`lenient` phi4rv's kinder extraction (`phi4rv eval tasks`)."]
    if any(r.errors or r.missing for r in rows):
        lines += ["", "Rerun `phi4rv eval run` with the same arguments to retry the errors and run the missing "
                  "samples; latency and token figures are over the samples that ran."]
    lines += [""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _json_safe(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def write_report(run_dirs: Sequence[Path], out: Path) -> dict:
    """report.md, report.json and Pareto PNGs (the paper's average, and one per task) in `out`."""
    rows = load_rows(run_dirs)
    if not rows:
        raise EvalError("no records found in " + ", ".join(map(str, run_dirs)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    average = paper_average(rows)
    figures = []
    if average:
        plot_pareto(average, "Average of " + ", ".join(PAPER_AVERAGE), out / "pareto.png")
        figures.append("pareto.png")
    for task in dict.fromkeys(r.task for r in rows):
        entries = [{"run": r.run, "mode": r.mode, "accuracy": r.accuracy, "latency_mean": r.latency_mean,
                    "output_tokens_mean": r.output_tokens_mean} for r in rows if r.task == task]
        name = f"pareto_{task}.png"
        plot_pareto(entries, task, out / name)
        figures.append(name)
    report = _json_safe({"rows": [asdict(r) for r in rows], "paper_average": average, "figures": figures,
                         "runs": [str(p) for p in run_dirs]})
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(to_markdown(rows, average, figures))
    return report
