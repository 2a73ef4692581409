"""`phi4rv recipe [ablate] [--preset tiny] [--out runs/tiny] [--seed 0 | --seeds 0,1,2 [--jobs 2]]`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from phi4rv.recipe.presets import PRESETS


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct seeds, got {text!r}")
    return seeds


def run_seeds(out: Path, preset_name: str, seeds: list[int], jobs: int) -> None:
    """One recipe run per seed in `out/seed-N/`, then `out/SEEDS.md`: the per-seed table and its
    spread. With `jobs` > 1 the seeds run in that many processes at once (one torch thread each,
    as in every run), their output in `out/seed-N.log`."""
    from phi4rv.recipe.presets import get_preset
    from phi4rv.recipe.report import write_seed_table
    from phi4rv.recipe.run import run_recipe

    out.mkdir(parents=True, exist_ok=True)
    preset = get_preset(preset_name)
    if jobs > 1:
        pending = list(seeds)
        running: list[tuple[int, subprocess.Popen]] = []
        failed = []
        while pending or running:
            while pending and len(running) < jobs:
                seed = pending.pop(0)
                log = open(out / f"seed-{seed}.log", "w")
                cmd = [sys.executable, "-m", "phi4rv", "recipe", "--preset", preset_name, "--seed", str(seed),
                       "--out", str(out / f"seed-{seed}")]
                running.append((seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
                print(f"seed {seed}: running, log {out / f'seed-{seed}.log'}", flush=True)
            seed, proc = running.pop(0)
            if proc.wait() != 0:
                failed.append(seed)
            print(f"seed {seed}: {'failed' if proc.returncode else 'done'}", flush=True)
        if failed:
            raise SystemExit(f"seed(s) {', '.join(map(str, failed))} failed; see {out}/seed-N.log")
    results = {seed: run_recipe(out / f"seed-{seed}", preset, seed) for seed in seeds}  # finished steps are skipped
    path = write_seed_table(out, preset, results)
    print(f"done: {path}", flush=True)


def cmd_recipe(args: argparse.Namespace) -> None:
    from phi4rv.recipe.ablate import run_ablations
    from phi4rv.recipe.presets import get_preset
    from phi4rv.recipe.run import run_recipe

    out = args.out or Path(f"runs/{args.preset}")
    if args.seeds is not None:
        if args.action == "ablate":
            raise SystemExit("--seeds runs the recipe, not its ablations; use --seed with ablate")
        run_seeds(out, args.preset, args.seeds, args.jobs)
        return
    run = run_ablations if args.action == "ablate" else run_recipe
    run(out, get_preset(args.preset), args.seed)


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "recipe",
        help="the paper's whole pipeline in miniature: data, stage 0-3 training, eval, REPORT.md",
        description="Run the tiny end-to-end recipe; a rerun with the same --out skips finished steps. "
        "`--seeds 0,1,2` runs it once per seed (OUT/seed-N/) and writes OUT/SEEDS.md, the per-seed table "
        "and its spread. `phi4rv recipe ablate` runs the recipe first (if needed), then the paper's three "
        "ablations: native vs low resolution, curated vs uncurated data, think ratio 0 / 0.2 / 1.0 (ABLATIONS.md).",
    )
    s.add_argument("action", nargs="?", choices=("run", "ablate"), default="run")
    s.add_argument("--preset", choices=list(PRESETS), default="tiny")
    s.add_argument("--out", type=Path, default=None, help="run folder (default runs/PRESET)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--seeds", type=parse_seeds, default=None, help="comma-separated seeds: one run each, and SEEDS.md")
    s.add_argument("--jobs", type=int, default=1, help="with --seeds: how many seeds run at once (default 1)")
    s.set_defaults(func=cmd_recipe)
