"""Generate many samples into Parquet shards with a manifest (what `phi4rv data synth` runs).

Sample k of task T under run seed S uses the seed `derive_seed(S, T, k)`, so a run is reproducible,
tasks don't share scenes, and any sample can be regenerated alone from its `meta["seed"]`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from phi4rv.data.formats import Sample, write_parquet
from phi4rv.data.synth import GENERATORS
from phi4rv.data.synth.common import Difficulty, get_difficulty


def derive_seed(run_seed: int, task: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{run_seed}/{task}/{index}".encode()).digest()[:6], "big")


def resolve_tasks(tasks: list[str]) -> list[str]:
    out: list[str] = []
    for t in tasks:
        for name in t.split(","):
            name = name.strip()
            if name == "all":
                out += list(GENERATORS)
            elif name in GENERATORS:
                out.append(name)
            else:
                raise ValueError(f"unknown task {name!r} (choose from {', '.join(GENERATORS)} or 'all')")
    return list(dict.fromkeys(out))


def _one(job: tuple[str, int, Difficulty]) -> Sample:
    task, seed, d = job
    return GENERATORS[task].generate(seed, d)


def generate_many(tasks: list[str], n: int, seed: int, difficulty: Difficulty | str, workers: int = 1,
                  progress: bool = True) -> Iterator[Sample]:
    """n samples per task, in order (task by task), optionally on several processes."""
    d = get_difficulty(difficulty)
    jobs = [(t, derive_seed(seed, t, k), d) for t in tasks for k in range(n)]
    bar = tqdm(total=len(jobs), desc="synth", unit="sample", disable=not progress)
    if workers <= 1:
        for job in jobs:
            yield _one(job)
            bar.update()
    else:
        with ProcessPoolExecutor(workers) as pool:
            for s in pool.map(_one, jobs, chunksize=16):
                yield s
                bar.update()
    bar.close()


def write_synthetic(tasks: list[str], n: int, seed: int, difficulty: Difficulty | str, out: str | Path,
                    shard_size: int = 1000, workers: int = 1, preview: int = 0) -> dict[str, Any]:
    from phi4rv.data.mix import Summary

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.parquet"):
        old.unlink()
    d = get_difficulty(difficulty)
    shards: list[str] = []
    buf: list[Sample] = []
    shown: list[Sample] = []
    per_task = -(-preview // max(1, len(tasks))) if preview else 0

    def flush() -> None:
        name = f"shard-{len(shards):05d}.parquet"
        write_parquet(buf, out / name)
        shards.append(name)
        buf.clear()

    summary = Summary()
    for s in generate_many(tasks, n, seed, d, workers):
        buf.append(s)
        summary.add(s)
        if preview and sum(1 for p in shown if p.meta["task"] == s.meta["task"]) < per_task:
            shown.append(s)
        if len(buf) >= shard_size:
            flush()
    if buf:
        flush()
    manifest = {
        "created_by": "phi4rv data synth",
        "requested_tasks": tasks,
        "n_per_task": n,
        "seed": seed,
        "difficulty": {"name": d.name, **{k: v for k, v in vars(d).items() if k != "name"}},
        "shards": shards,
        **summary.result(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if preview:
        from phi4rv.data.synth.preview import contact_sheet

        # round-robin over tasks so every task shows up before any shows twice
        by_task = [[p for p in shown if p.meta["task"] == t] for t in tasks]
        order = [group[k] for k in range(per_task) for group in by_task if k < len(group)]
        contact_sheet(order[:preview]).save(out / "preview.png")
    return manifest
