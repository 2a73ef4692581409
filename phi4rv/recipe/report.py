"""REPORT.md of a recipe run: what ran and how long, the mode table, the targets, plots, a chat."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from phi4rv.processing.reasoning import MODES
from phi4rv.recipe.runner import LINES, STEPS

EXAMPLE_IMAGE = Path(__file__).resolve().parents[2] / "examples" / "images" / "photo.jpg"
TARGETS = {"minutes": 20.0, "perception": 80.0, "think_gain": 20.0, "auto_choice": 90.0}


def machine() -> str:
    threads = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {threads} threads"


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    ev = results["eval"]
    minutes = sum(v["seconds"] for k, v in results.items() if isinstance(v, dict) and "seconds" in v) / 60
    perception = ev["nothink"]["perception"]["accuracy"]
    gain = ev["think"]["reasoning"]["accuracy"] - ev["nothink"]["reasoning"]["accuracy"]
    return [
        (f"whole run <= {TARGETS['minutes']:.0f} min", f"{minutes:.1f} min (steps before the report)", minutes <= TARGETS["minutes"]),
        (f"perception, direct answers >= {TARGETS['perception']:.0f}%", f"{perception:.1f}% (nothink)", perception >= TARGETS["perception"]),
        (f"multi-step: think beats nothink by >= {TARGETS['think_gain']:.0f} pts",
         f"{ev['think']['reasoning']['accuracy']:.1f}% vs {ev['nothink']['reasoning']['accuracy']:.1f}% ({gain:+.1f})",
         gain >= TARGETS["think_gain"]),
        (f"auto picks the right mode >= {TARGETS['auto_choice']:.0f}%", f"{ev['auto_choice']:.1f}%", ev["auto_choice"] >= TARGETS["auto_choice"]),
    ]


def _mode_rows(ev: dict[str, Any]) -> list[str]:
    lines = ["| mode | kind | n | accuracy % | output tokens | seconds / question | answered in think % |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        for kind in ("perception", "reasoning", "all"):
            c = ev[mode].get(kind)
            if c:
                lines.append(f"| {mode} | {kind} | {c['n']} | {c['accuracy']:.1f} | {c['tokens']:.1f} | "
                             f"{c['seconds']:.3f} | {c['think_share']:.0f} |")
    lines += ["", "| task | " + " | ".join(f"{m} %" for m in MODES) + " |", "|---|" + "---:|" * len(MODES)]
    for task in sorted(k for k in ev["auto"] if k.startswith("task:")):
        lines.append(f"| {task[5:]} | " + " | ".join(f"{ev[m][task]['accuracy']:.1f}" for m in MODES) + " |")
    return lines


def plot_vision_loss(run: Path) -> str | None:
    path = run / "stage0_vision_loss.json"
    if not path.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(loss) + 1), loss)
    ax.set(xlabel="step", ylabel="sigmoid loss", title="stage 0: vision encoder (contrastive)")
    fig.tight_layout()
    fig.savefig(run / "stage0_vision_loss.png", dpi=100)
    plt.close(fig)
    return "stage0_vision_loss.png"


def chat_examples(run: Path, max_new_tokens: int) -> list[str]:
    from phi4rv.chat_model import ChatModel
    from phi4rv.data.formats import read_samples
    from phi4rv.generation.sampling import SamplingParams

    cm = ChatModel.load(run / "model")
    params = cm.params(max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=0))
    lines = []
    held = list(read_samples(run / "data" / "mix" / "heldout"))
    picks = [next((s for s in held if s.meta["kind"] == kind), None) for kind in ("perception", "reasoning")]
    for k, s in enumerate(x for x in picks if x is not None):
        name = f"example_{k}.png"
        (run / name).write_bytes(s.images[0])
        res = cm.chat(s.messages[:-1], images=s.images, mode="auto", params=params)
        q = s.messages[0]["content"].replace("<image>\n", "")
        lines += [f"![held-out image]({name})", "", f"**{q}** (auto mode, greedy; truth: {s.meta['answer']})", "",
                  f"- chosen mode: {res.mode}" + (f"; thinking: `{res.thinking!r}`" if res.thinking else ""),
                  f"- answer: `{res.answer}`", ""]
    if EXAMPLE_IMAGE.is_file():
        res = cm.chat([{"role": "user", "content": "<image>\nHow many cards are there?"}], images=[EXAMPLE_IMAGE],
                      mode="auto", params=params)
        lines += ["A real photo (`examples/images/photo.jpg`, from the release's reference images), a question "
                  "from the cards world: the tiny model knows nothing but cards, so this shows the plumbing "
                  "(any image size through NaFlex), not understanding.", "",
                  f"- `phi4rv chat --model {run / 'model'} --image examples/images/photo.jpg \"How many cards are there?\"`",
                  f"- chosen mode: {res.mode}; answer: `{res.answer}`", ""]
    return lines


def render(r: Any, results: dict[str, Any]) -> str:
    run: Path = r.out
    ev, data = results["eval"], results["data"]
    total = sum(v["seconds"] for v in results.values() if isinstance(v, dict) and "seconds" in v)
    lines = [
        f"# phi4rv recipe: preset `{r.p.name}`, seed {r.seed}", "",
        f"`phi4rv recipe --preset {r.p.name} --seed {r.seed} --out {run}` on {machine()}.", "",
        "The paper's pipeline in miniature on the number-cards world (`phi4rv.data.synth.cards`): "
        "perception questions (read a card, find a card, count) are answered directly; multi-step "
        "questions (sum of all cards, product of two) are reasoned in `<think>`.", "",
        "## Steps", "", "| step | seconds | CPU seconds | result |", "|---|---:|---:|---|",
    ]
    cpu = sum(results[name].get("cpu_seconds", 0.0) for name in STEPS[:-1])
    for name in STEPS[:-1]:
        x = results[name]
        lines.append(f"| {name} | {x['seconds']:.0f} | {x.get('cpu_seconds', float('nan')):.0f} | {_summary(name, x)} |")
    lines += [f"| **total** | **{total:.0f}** ({total / 60:.1f} min) | {cpu:.0f} ({cpu / 60:.1f} min) | |", "",
              "CPU seconds: the run's own processor time; with its one torch thread, about the wall time on an idle "
              "core (the wall time also counts waiting for a busy machine's cores).", "", "## Targets", "",
              "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in targets(results)]
    lines += ["", "Same seed, same metrics: `tests/test_recipe.py` runs the recipe twice with one seed and compares "
              "every metric of the two runs.", "", "## Modes: auto / forced think / forced nothink", ""]
    lines += _mode_rows(ev)
    lines += ["", "Greedy decoding, batch of " + str(r.p.eval_batch) + f", at most {r.p.max_new_tokens} new tokens; "
              "seconds are per question within a batch. Records: `eval/`; `phi4rv eval report` tables: `eval/report/`.", "",
              "![accuracy vs time and tokens](eval/report/pareto_synthetic.png)", "", "## Training", ""]
    lines += _validation_rows(run)
    for png in sorted(run.glob("stage0_decoder/*/curves.png")) + sorted(run.glob("stages/*/curves.png")):
        lines += [f"![{png.parent.name}]({png.relative_to(run)})", ""]
    vision_png = plot_vision_loss(run)
    if vision_png:
        lines += [f"![stage 0 vision]({vision_png})", ""]
    lines += ["## Data", "", f"- synthesized: {data['synth']}; kept by curation: {data['kept']} "
              "(`data/clean/report.md`)",
              f"- mixture: {data['train']} train / {data['heldout']} held out, think ratio {data['think_ratio']:.2f} "
              "(`data/mix/manifest.json`)",
              f"- stage 0 text: {data['text']}; stage 1 captions: {data['align']}; stage 3: {data['stage3']}", "",
              "## Chat", ""]
    lines += chat_examples(run, r.p.max_new_tokens)
    lines += ["## The final model", "", f"`{run / 'model'}` is a release-format checkpoint: "
              f"`phi4rv chat --model {run / 'model'} --image IMAGE \"QUESTION\"` or "
              f"`phi4rv serve --model {run / 'model'}`.", ""]
    return "\n".join(lines)


def _validation_rows(run: Path) -> list[str]:
    """Each stage's last eval on the validation split (what settings are tuned on; the held-out
    split above is only reported)."""
    rows = []
    for stage in ("alignment", "instruction", "long"):
        path = run / "stages" / stage / "metrics.jsonl"
        evals = [json.loads(x) for x in path.read_text().splitlines() if "eval/loss" in x] if path.is_file() else []
        if evals:
            rows.append(f"| {stage} | {evals[-1]['step']} | {evals[-1]['eval/loss']:.3f} | {100 * evals[-1]['eval/token_acc']:.1f} |")
    if not rows:
        return []
    return ["Validation split (`data/mix/val`, apart from the held-out split by image), at the end of each stage:", "",
            "| stage | step | loss | answer-token accuracy % |", "|---|---:|---:|---:|", *rows, ""]


def _summary(name: str, x: dict[str, Any]) -> str:
    return LINES[name](x)


# ---- several seeds -----------------------------------------------------------------------------

SEED_COLUMNS = (
    ("minutes", "whole run, min"),
    ("cpu_minutes", "CPU, min"),
    ("perception", "perception nothink %"),
    ("think", "multi-step think %"),
    ("nothink", "multi-step nothink %"),
    ("think_gain", "think - nothink, pts"),
    ("auto_choice", "auto picks right %"),
    ("text_acc", "stage 0 text acc %"),
    ("retrieval", "stage 0 retrieval %"),
)


def seed_row(results: dict[str, Any]) -> dict[str, float]:
    ev = results["eval"]
    think, nothink = ev["think"]["reasoning"]["accuracy"], ev["nothink"]["reasoning"]["accuracy"]
    return {
        "minutes": sum(v["seconds"] for k, v in results.items() if k != "report" and isinstance(v, dict) and "seconds" in v) / 60,
        "cpu_minutes": sum(v.get("cpu_seconds", 0.0) for k, v in results.items() if k != "report" and isinstance(v, dict)) / 60,
        "perception": ev["nothink"]["perception"]["accuracy"], "think": think, "nothink": nothink,
        "think_gain": think - nothink, "auto_choice": ev["auto_choice"],
        "text_acc": 100 * results["stage0_decoder"]["answer_acc"], "retrieval": 100 * results["stage0_vision"]["retrieval_after"],
    }


def write_seed_table(out: Path, preset: Any, results: dict[int, dict[str, Any]]) -> Path:
    """SEEDS.md: per seed, the targets' figures and whether all are met; then min, max, mean and spread."""
    rows = {seed: seed_row(r) for seed, r in results.items()}
    met = {seed: all(ok for _, _, ok in targets(r)) for seed, r in results.items()}
    head = "| seed | " + " | ".join(label for _, label in SEED_COLUMNS) + " | all targets met |"
    lines = [f"# phi4rv recipe: preset `{preset.name}`, seeds {', '.join(map(str, results))}", "",
             f"On {machine()}; each seed's report: `seed-N/REPORT.md`. Targets: whole run <= {TARGETS['minutes']:.0f} min, "
             f"perception (nothink) >= {TARGETS['perception']:.0f}%, think beats nothink on multi-step questions by >= "
             f"{TARGETS['think_gain']:.0f} points, auto picks the right mode >= {TARGETS['auto_choice']:.0f}%.", "",
             head, "|---:|" + "---:|" * len(SEED_COLUMNS) + "---|"]
    for seed, row in rows.items():
        lines.append(f"| {seed} | " + " | ".join(f"{row[k]:.1f}" for k, _ in SEED_COLUMNS) + f" | {'yes' if met[seed] else '**no**'} |")
    for name, fn in (("min", min), ("max", max), ("mean", lambda xs: sum(xs) / len(xs)),
                     ("spread (max - min)", lambda xs: max(xs) - min(xs))):
        lines.append(f"| {name} | " + " | ".join(f"{fn([row[k] for row in rows.values()]):.1f}" for k, _ in SEED_COLUMNS) + " | |")
    lines += ["", f"All targets met on {sum(met.values())} of {len(met)} seeds."]
    failing = {seed: [t for t, _, ok in targets(results[seed]) if not ok] for seed in results if not met[seed]}
    for seed, names in failing.items():
        lines.append(f"- seed {seed} misses: " + "; ".join(names))
    path = out / "SEEDS.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "seeds.json").write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=2) + "\n")
    return path
