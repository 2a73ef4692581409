"""`phi4rv recipe`: the paper's pipeline in miniature, one step after another, in one folder.

    tokenizer -> data (synth -> curate -> mix) -> stage 0 (decoder on reasoning text; vision
    encoder by sigmoid contrastive loss) -> stages 1-3 (the training system) -> eval in auto /
    think / nothink -> REPORT.md

Each finished step writes `steps/<name>.json` (its summary and wall time); a rerun with the same
folder skips finished steps, so a crash loses at most the step it happened in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from phi4rv.recipe import steps
from phi4rv.recipe.presets import RecipePreset
from phi4rv.recipe.runner import LINES, Runner, say


def run_recipe(out: str | Path, preset: RecipePreset, seed: int = 0) -> dict[str, Any]:
    # one thread count on every machine: the default (a machine's cores) changes how sums are split,
    # and with it every float after the first step
    torch.set_num_threads(preset.threads)
    torch.manual_seed(seed)
    r = Runner(Path(out), preset, seed)
    fns = {"tokenizer": steps.make_tokenizer, "data": steps.make_data, "stage0_decoder": steps.pretrain_decoder,
           "stage0_vision": steps.pretrain_vision_encoder, "stages": steps.train_stages, "eval": steps.evaluate}
    results: dict[str, Any] = {}
    for name, fn in fns.items():
        results[name] = r.step(name, lambda fn=fn: fn(r), LINES[name])
    results["report"] = r.step("report", lambda: steps.write_report(r, results), LINES["report"])
    say(f"done: {r.out / 'REPORT.md'}; the model (release format) is {r.model}")
    return results
