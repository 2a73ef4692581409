"""`phi4rv recipe [ablate] [--preset tiny] [--out runs/tiny] [--seed 0]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from phi4rv.recipe.presets import PRESETS


def cmd_recipe(args: argparse.Namespace) -> None:
    from phi4rv.recipe.ablate import run_ablations
    from phi4rv.recipe.presets import get_preset
    from phi4rv.recipe.run import run_recipe

    run = run_ablations if args.action == "ablate" else run_recipe
    run(args.out or Path(f"runs/{args.preset}"), get_preset(args.preset), args.seed)


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "recipe",
        help="the paper's whole pipeline in miniature: data, stage 0-3 training, eval, REPORT.md",
        description="Run the tiny end-to-end recipe; a rerun with the same --out skips finished steps. "
        "`phi4rv recipe ablate` runs the recipe first (if needed), then the paper's three ablations: "
        "native vs low resolution, curated vs uncurated data, think ratio 0 / 0.2 / 1.0 (ABLATIONS.md).",
    )
    s.add_argument("action", nargs="?", choices=("run", "ablate"), default="run")
    s.add_argument("--preset", choices=list(PRESETS), default="tiny")
    s.add_argument("--out", type=Path, default=None, help="run folder (default runs/PRESET)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_recipe)
