"""Per-sample records: one JSON line per sample in `RUN_DIR/<task>/<mode>.jsonl`, plus `run.json`.

A record holds everything the report needs (so every figure can be recomputed from the lines):

    id, task, version, mode, prompt (messages), n_images, target, groups,
    output (raw text), thinking, answer, answered_mode, finish_reason,
    parse ("ok" | "unparsed" | "no_answer" | "error"), prediction, score, judged,
    tokens {prompt, image, thinking, answer, output}, times {preprocess, prefill, decode, ttft, total, …},
    error

`run.json` holds the run's settings, each task's version and options (its scoring `rules`
included) and how many samples each task selected, so a report counts the ones without a record.

Times add up: ttft = preprocess + prefill (+ vision for the local backend), total = ttft + decode.
A rerun skips ids that already have a record, except errors (retried; the later line wins).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from phi4rv.eval.tasks.base import EvalError

PARSE_STATUSES = ("ok", "unparsed", "no_answer", "error")
RUN_FILE = "run.json"


def records_path(run_dir: Path, task: str, mode: str) -> Path:
    return Path(run_dir) / task / f"{mode}.jsonl"


def iter_lines(path: Path) -> Iterator[dict]:
    if not path.is_file():
        return
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                # an interrupted write leaves a partial last line: that sample is simply redone
                warnings.warn(f"{path}:{n}: skipping an unreadable line", stacklevel=2)


def read_records(path: Path) -> dict[str, dict]:
    """id -> record; for an id written twice (an error retried) the later line wins."""
    return {r["id"]: r for r in iter_lines(path)}


def done_ids(records: dict[str, dict]) -> set[str]:
    return {i for i, r in records.items() if r.get("parse") != "error"}


class RecordWriter:
    """Appends records, flushed line by line so an interrupted run keeps what it finished."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- run.json ---------------------------------------------------------------------------------


def read_run(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise EvalError(f"{run_dir} is not an eval run (no {RUN_FILE})")
    return json.loads(path.read_text())


def merge_run(run_dir: Path, new: dict) -> dict:
    """Write run.json for a new run, or check that a resumed run has the same settings (backend,
    generation settings, task versions and options) and add its tasks and modes."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, new)
        return new
    old = json.loads(path.read_text())
    for key in ("backend", "settings"):
        if old.get(key) != new.get(key):
            raise EvalError(f"{run_dir} holds a run with different {key} ({_diff(old.get(key), new.get(key))}); use another --out")
    for name, spec in new["tasks"].items():
        if name in old["tasks"] and old["tasks"][name] != spec:
            raise EvalError(f"{run_dir}: task {name} has different version/options than the recorded run; use another --out")
    merged = {**old, "tasks": {**old["tasks"], **new["tasks"]}, "modes": list(dict.fromkeys(old["modes"] + new["modes"])),
              "samples": {**old.get("samples", {}), **new.get("samples", {})}}
    _write(path, merged)
    return merged


def _diff(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys)
    return f"{a!r} -> {b!r}"


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
