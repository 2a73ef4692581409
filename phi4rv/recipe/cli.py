"""`phi4rv recipe [--preset tiny] [--out runs/tiny] [--seed 0]` and `phi4rv recipe ablate`."""

from __future__ import annotations

import argparse
from pathlib import Path

from phi4rv.recipe.presets import PRESETS


def cmd_recipe(args: argparse.Namespace) -> None:
    from phi4rv.recipe.presets import get_preset

    preset = get_preset(args.preset)
    if args.action == "ablate":
        from phi4rv.recipe.ablate import run_ablations

        run_ablations(args.out or Path(f"runs/{args.preset}-ablate"), preset, args.seed, args.base)
    else:
        from phi4rv.recipe.run import run_recipe

        run_recipe(args.out or Path(f"runs/{args.preset}"), preset, args.seed)


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "recipe",
        help="the paper's whole pipeline in miniature: data, stage 0-3 training, eval, REPORT.md",
        description="Run the tiny end-to-end recipe (a rerun with the same --out skips finished steps), "
        "or `ablate`: native resolution vs low resolution, curated vs uncurated data, think ratio 0 / 0.2 / 1.",
    )
    s.add_argument("action", nargs="?", choices=["run", "ablate"], default="run")
    s.add_argument("--preset", choices=list(PRESETS), default="tiny")
    s.add_argument("--out", type=Path, default=None, help="run folder (default runs/PRESET, runs/PRESET-ablate)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--base", type=Path, default=None,
                   help="ablate: a finished recipe run whose tokenizer, data and stage-0 model to reuse")
    s.set_defaults(func=cmd_recipe)
