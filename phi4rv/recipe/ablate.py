"""`phi4rv recipe ablate`: the paper's three lessons in miniature, on the recipe's own data.

Every arm trains stage 2 from the recipe's stage-1 checkpoint with one thing changed, and is
evaluated on the recipe's held-out split in the three modes. The recipe's own stage 2 is the
reference arm: native resolution, curated data, think ratio 0.2.

- resolution: the NaFlex budget of the recipe (each 16 px card gets its own patch) vs a fixed low
  budget (`ablate_low_patches`: the images are shrunk to fit, the digits with them);
- curation: the training split with a share of wrong answers planted (`ablate_defects`), trained
  on as it is vs after `phi4rv.data.curate` has removed them (for as many steps as the full split:
  the lesson is about what the compute is spent on, not about less compute);
- think ratio: 0 (every answer direct), 0.2 (the recipe's mix), 1.0 (every answer reasoned, the
  perception answers with the card reading as their trace).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from phi4rv.data.formats import Sample, mode_of, read_samples
from phi4rv.recipe import data as world
from phi4rv.recipe.runner import Runner, say, train_config
from phi4rv.recipe.steps import write_shard

ARMS = ("reference", "low_res", "uncurated", "curated", "think_0", "think_1")


def arm_data(r: Runner, arm: str) -> tuple[Path, list[Sample], dict[str, Any]]:
    """The arm's training split (folder and samples) and what was done to it."""
    from phi4rv.data.curate import CurateConfig, curate

    train = r.data("mix") / "train"
    samples = list(read_samples(train))
    if arm in ("reference", "low_res"):
        return train, samples, {}
    root = r.out / "ablate" / "data"
    if arm.startswith("think_"):
        changed = [world.as_mode(s, "think" if arm == "think_1" else "nothink") for s in samples]
        return write_shard(changed, root / arm), changed, {}
    rng = random.Random(r.seed + 11)
    broken = {s.id for s in samples if rng.random() < r.p.ablate_defects}
    planted = [world.plant_defect(s, rng) if s.id in broken else s for s in samples]
    uncurated = write_shard(planted, root / "uncurated")  # the curated arm starts from the same folder
    if arm == "uncurated":
        return uncurated, planted, {"planted": len(broken)}
    curate([uncurated], CurateConfig(seed=r.seed, near_duplicate_bits=-1), root / arm)
    kept = list(read_samples(root / arm))
    left = broken & {s.id for s in kept}
    return root / arm, kept, {"planted": len(broken), "removed": len(samples) - len(kept), "planted_left": len(left)}


def run_arm(r: Runner, arm: str) -> dict[str, Any]:
    from phi4rv.recipe.steps import evaluate, stage_configs, stage_steps
    from phi4rv.train import train

    out = r.out / "ablate" / arm
    data, samples, info = arm_data(r, arm)
    if arm == "reference":
        model = r.out / "stages" / "instruction" / "final"
    else:
        stage = stage_configs(r)["instruction"]
        stage["data"]["datasets"] = [{"path": str(data), "weight": 1.0}]
        if arm == "curated":  # as many steps as the full split got: fewer samples, same compute
            stage["max_steps"] = stage_steps(r.out / "stages" / "instruction")
        overrides = {"max_num_patches": r.p.ablate_low_patches} if arm == "low_res" else {}
        start = {"checkpoint": str(r.out / "stages" / "alignment" / "final"), "overrides": overrides}
        model = train(train_config(out / "train", start, {"instruction": stage}, r.seed))["instruction"]
    think = sum(mode_of(s.messages[-1]["content"]) == "think" for s in samples)
    config = json.loads((Path(model) / "config.json").read_text())
    return {"model": str(model), "samples": len(samples), "steps": stage_steps(Path(model).parent),
            "think_ratio": think / max(1, len(samples)),
            "max_num_patches": config["max_num_patches"], **info, "eval": evaluate(r, Path(model), out / "eval")}


def arm_line(x: dict[str, Any]) -> str:
    ev = x["eval"]
    return (f"{x['samples']} samples, think ratio {x['think_ratio']:.2f}, max {x['max_num_patches']} patches; "
            f"nothink perception {ev['nothink']['perception']['accuracy']:.0f}%, "
            f"auto all {ev['auto']['all']['accuracy']:.0f}%")


def run_ablations(out: str | Path, preset: Any, seed: int = 0) -> dict[str, Any]:
    """The recipe (finished steps are skipped), then one step per arm, then ABLATIONS.md."""
    from phi4rv.recipe.run import run_recipe

    run_recipe(out, preset, seed)
    r = Runner(Path(out), preset, seed)
    arms = {arm: r.step(f"ablate_{arm}", lambda arm=arm: run_arm(r, arm), arm_line) for arm in ARMS}
    path = r.out / "ABLATIONS.md"
    path.write_text(render(r, arms))
    say(f"done: {path}")
    return arms


def _acc(x: dict[str, Any], mode: str, key: str) -> float:
    return x["eval"][mode].get(key, {}).get("accuracy", 0.0)


def plot(r: Runner, arms: dict[str, dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(12, 3.6))
    res = [("native", arms["reference"]), (f"low ({r.p.ablate_low_patches} patches)", arms["low_res"])]
    a.bar([n for n, _ in res], [_acc(x, "nothink", "perception") for _, x in res], color=["C0", "C1"])
    a.set(title="resolution", ylabel="perception accuracy % (nothink)", ylim=(0, 100))
    cur = [("uncurated", arms["uncurated"]), ("curated", arms["curated"])]
    b.bar([n for n, _ in cur], [_acc(x, "auto", "all") for _, x in cur], color=["C1", "C0"])
    b.set(title=f"curation ({r.p.ablate_defects:.0%} wrong answers planted)", ylabel="accuracy % (auto, all)",
          ylim=(0, 100))
    ratios = [(0.0, arms["think_0"]), (0.2, arms["reference"]), (1.0, arms["think_1"])]
    xs = [t for t, _ in ratios]
    for kind, style in (("perception", "o-"), ("reasoning", "s-")):
        c.plot(xs, [_acc(x, "auto", kind) for _, x in ratios], style, label=f"{kind} accuracy")
    c.set(title="think ratio", xlabel="share of think samples in training", ylabel="accuracy % (auto)", ylim=(0, 100))
    tokens = c.twinx()
    tokens.plot(xs, [x["eval"]["auto"]["all"]["tokens"] for _, x in ratios], "d--", color="C3", label="output tokens")
    tokens.set_ylabel("mean output tokens (auto)")
    lines = c.get_legend_handles_labels()[0] + tokens.get_legend_handles_labels()[0]
    c.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(r.out / "ablations.png", dpi=100)
    plt.close(fig)
    return "ablations.png"


def render(r: Runner, arms: dict[str, dict[str, Any]]) -> str:
    ref, low = arms["reference"], arms["low_res"]
    lines = [
        f"# phi4rv recipe ablate: preset `{r.p.name}`, seed {r.seed}", "",
        f"`phi4rv recipe ablate --preset {r.p.name} --seed {r.seed} --out {r.out}`. Every arm is stage 2 "
        "trained from the same stage-1 checkpoint with one thing changed, evaluated on the same held-out "
        f"split ({ref['eval']['auto']['all']['n']} questions per mode, greedy); the reference arm is the "
        "recipe's own stage 2.", "",
        f"![the three lessons]({plot(r, arms)})", "",
        "## 1. Native resolution vs a fixed low resolution", "",
        "| arm | max patches | perception (nothink) % | card_digit % | card_place % | card_count % | all (auto) % |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, x in (("native (NaFlex budget)", ref), ("low resolution", low)):
        lines.append(f"| {name} | {x['max_num_patches']} | {_acc(x, 'nothink', 'perception'):.1f} | "
                     + " | ".join(f"{_acc(x, 'nothink', 'task:' + t):.1f}" for t in ("card_digit", "card_place", "card_count"))
                     + f" | {_acc(x, 'auto', 'all'):.1f} |")
    unc, cur = arms["uncurated"], arms["curated"]
    lines += ["", "## 2. Curated vs uncurated data", "",
              f"{unc['planted']} of {unc['samples']} training answers were replaced by wrong ones. Curation removed "
              f"{cur['removed']} samples; {cur['planted_left']} planted answers got through. The curated arm "
              "trains for as many steps as the reference arm: less data, the same compute.", "",
              "| arm | training samples | steps | perception (auto) % | reasoning (auto) % | all (auto) % |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, x in (("uncurated", unc), ("curated", cur), ("reference (clean)", ref)):
        lines.append(f"| {name} | {x['samples']} | {x['steps']} | {_acc(x, 'auto', 'perception'):.1f} | "
                     f"{_acc(x, 'auto', 'reasoning'):.1f} | {_acc(x, 'auto', 'all'):.1f} |")
    lines += ["", "## 3. Think ratio", "",
              "| think ratio | training steps | mode | perception % | reasoning % | all % | output tokens "
              "| answered in think % |",
              "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for x in (arms["think_0"], ref, arms["think_1"]):
        for mode in ("auto", "think", "nothink"):
            ev = x["eval"][mode]
            lines.append(f"| {x['think_ratio']:.2f} | {x['steps']} | {mode} | {_acc(x, mode, 'perception'):.1f} | "
                         f"{_acc(x, mode, 'reasoning'):.1f} | {ev['all']['accuracy']:.1f} | {ev['all']['tokens']:.1f} | "
                         f"{ev['all']['think_share']:.0f} |")
    lines += ["", "Per-arm records and `phi4rv eval report` tables: `ablate/ARM/eval/`.", ""]
    return "\n".join(lines)
