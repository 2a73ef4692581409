"""`phi4rv recipe [--preset tiny] [--out runs/tiny] [--seed 0]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from phi4rv.recipe.presets import PRESETS


def cmd_recipe(args: argparse.Namespace) -> None:
    from phi4rv.recipe.presets import get_preset
    from phi4rv.recipe.run import run_recipe

    run_recipe(args.out or Path(f"runs/{args.preset}"), get_preset(args.preset), args.seed)


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "recipe",
        help="the paper's whole pipeline in miniature: data, stage 0-3 training, eval, REPORT.md",
        description="Run the tiny end-to-end recipe; a rerun with the same --out skips finished steps.",
    )
    s.add_argument("--preset", choices=list(PRESETS), default="tiny")
    s.add_argument("--out", type=Path, default=None, help="run folder (default runs/PRESET)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_recipe)
