"""Data engine throughput: samples/s per core for every synthetic generator and for curation.

Each generator makes `--n` samples in this one process (one core: PIL drawing and PNG encoding
are single-threaded), after one untimed warm-up sample; the figure is samples/s, the median of
`--repeats` runs, with the mean PNG size. Curation runs `phi4rv.data.curate` (decode, checks,
dHash, duplicate index, repair, shards, report) over a Parquet dataset of all tasks mixed,
created beforehand and not timed. `data synth --workers N` scales with processes; multiply by
the cores you give it.

    python bench/data_throughput.py                      # default difficulty, 40 samples per generator
    python bench/data_throughput.py --tiny               # a few seconds (smoke test)
    python bench/data_throughput.py --difficulty tiny --n 200 --json out/data.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine, print_machine, print_table, write_json

from phi4rv.data.curate import CurateConfig, curate
from phi4rv.data.formats import write_parquet
from phi4rv.data.synth import DIFFICULTIES, GENERATORS


def time_generator(name: str, difficulty: str, n: int, repeats: int, seed: int) -> dict:
    gen = GENERATORS[name]
    t0 = time.perf_counter()
    gen.generate(seed - 1, difficulty)  # warm-up: fonts, imports
    warm = time.perf_counter() - t0
    rates, sizes = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        for k in range(n):
            s = gen.generate(seed + r * n + k, difficulty)
            if r == 0:
                sizes.append(sum(len(b) for b in s.images))
        rates.append(n / (time.perf_counter() - t0))
    return {"samples_per_s": statistics.median(rates), "best_samples_per_s": max(rates), "warmup_s": warm,
            "png_kb": statistics.mean(sizes) / 1024, "n": n, "repeats": repeats}


def time_curation(difficulty: str, per_task: int, seed: int) -> dict:
    samples = [GENERATORS[t].generate(seed + k, difficulty) for t in GENERATORS for k in range(per_task)]
    with tempfile.TemporaryDirectory() as tmp:
        write_parquet(samples, Path(tmp) / "in.parquet")
        t0 = time.perf_counter()
        report = curate([Path(tmp) / "in.parquet"], CurateConfig(), Path(tmp) / "out")
        dt = time.perf_counter() - t0
    return {"samples": len(samples), "seconds": dt, "samples_per_s": len(samples) / dt, "kept": report["kept"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--difficulty", default=None, choices=list(DIFFICULTIES), help="default: 'default' ('tiny' with --tiny)")
    p.add_argument("--n", type=int, default=None, help="samples per generator per run (default 40; 4 with --tiny)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per generator (default 3)")
    p.add_argument("--curate-per-task", type=int, default=None, help="samples per task in the curation set (default 20)")
    p.add_argument("--tasks", nargs="*", default=None, help="only these generators")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a few seconds: tiny difficulty, few samples")
    p.add_argument("--device", default="cpu", help="accepted for symmetry with the other benchmarks; CPU only")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    difficulty = args.difficulty or ("tiny" if args.tiny else "default")
    n = args.n or (4 if args.tiny else 40)
    repeats = args.repeats or 3
    per_task = args.curate_per_task or (2 if args.tiny else 20)
    tasks = args.tasks or list(GENERATORS)

    info = machine(torch.device("cpu"), torch.float32)
    info.pop("dtype", None)
    print_machine(info)
    print(f"difficulty {difficulty}, {n} samples x {repeats} runs per generator, one process (one core)")
    results = {name: time_generator(name, difficulty, n, repeats, args.seed) for name in tasks}
    rows = [[name, GENERATORS[name].kind, r["samples_per_s"], 1000 / r["samples_per_s"], r["png_kb"]]
            for name, r in results.items()]
    print_table(["generator", "kind", "samples/s/core", "ms/sample", "PNG KB/sample"], rows)
    cur = time_curation(difficulty, per_task, args.seed)
    print(f"\ncuration: {cur['samples']} samples ({per_task} per task, {difficulty}) in {cur['seconds']:.2f} s = "
          f"{cur['samples_per_s']:.1f} samples/s/core (kept {cur['kept']})")
    overall = statistics.mean(r["samples_per_s"] for r in results.values())
    print(f"generators: mean {overall:.1f} samples/s/core over {len(results)} tasks")
    write_json(args.json, {"machine": info, "difficulty": difficulty, "generators": results, "curation": cur,
                           "mean_generator_samples_per_s": overall})


if __name__ == "__main__":
    main()
