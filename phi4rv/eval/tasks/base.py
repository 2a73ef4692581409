"""What a task is: loader + prompt + generation settings + extractor + scorer, with a version.

A task reads a local copy of its benchmark in the official release's layout (nothing is
downloaded) and turns each row into an `EvalSample`: the user prompt (with one `<image>\\n` per
image, where the image goes), the images, the gold answer and what the scorer needs. Scoring sees
only the answer part of an output (`processing.reasoning.parse_completion` splits it off first) and returns `Scored`.
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi4rv.data.formats import ImageRef
from phi4rv.eval.official import RULES
from phi4rv.eval.scoring import Scored


class EvalError(ValueError):
    """A problem the user can fix (missing data, bad option); printed as one line."""


@dataclass
class EvalSample:
    id: str
    messages: list[dict[str, str]]  # user (and earlier) turns; string contents with "<image>\n" tags
    images: list[ImageRef]
    target: Any  # the gold answer, JSON-serialisable
    groups: dict[str, str] = field(default_factory=dict)  # breakdown keys, e.g. {"type": "human_test"}
    info: dict[str, Any] = field(default_factory=dict)  # what the scorer needs besides the target


class Task:
    name: str = ""
    version: str = "1"
    folders: tuple[str, ...] = ()  # where the data lives under --data-dir (first existing one)
    max_new_tokens: int = 4096  # the paper's protocol
    layout: str = ""  # one line shown by `phi4rv eval tasks`
    has_rules: bool = True  # False: one scoring rule only (the synthetic task's verifier)

    def __init__(self, rules: str = "official"):
        if rules not in RULES:
            raise EvalError(f"rules must be one of {', '.join(RULES)}, got {rules!r}")
        self.rules = rules

    def load(self, path: Path | None) -> list[EvalSample]:
        raise NotImplementedError

    def score(self, sample: EvalSample, answer: str) -> Scored:
        """Score an answer (reasoning already removed)."""
        raise NotImplementedError

    def metrics(self, rows: list[dict]) -> dict[str, float]:
        """Percentages from record-like dicts (`score`, `groups`): overall and per group value.
        Every row counts: a failed or missing sample comes in with score 0."""
        out = {"accuracy": mean_pct([r["score"] for r in rows])}
        by: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            for key, value in (r.get("groups") or {}).items():
                by[f"{key}/{value}"].append(r["score"])
        out.update({k: mean_pct(v) for k, v in sorted(by.items())})
        return out

    def options(self) -> dict[str, Any]:
        """Settings that change scores (recorded in run.json; a resumed run must match)."""
        return {"rules": self.rules} if self.has_rules else {}

    def find_data(self, data_dir: Path | None) -> Path | None:
        if data_dir is None:
            raise EvalError(f"no data for task {self.name!r}: give --data-dir")
        for name in self.folders:
            for cand in (data_dir / name, *(p for p in data_dir.glob("*") if p.name.lower() == name.lower())):
                if cand.exists():
                    return cand
        raise EvalError(f"no data for task {self.name!r} under {data_dir} (expected one of: {', '.join(self.folders)})")


def mean_pct(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else float("nan")


# ---- loading helpers --------------------------------------------------------------------------


def parquet_rows(folder: Path, split: str) -> list[dict]:
    """Rows of the Hugging Face Parquet files of one split under `folder`, in file-name order
    (`data/test-00000-of-00002.parquet`, `test.parquet`, `Art/validation-….parquet`, …)."""
    import pyarrow.parquet as pq

    if folder.is_file():
        files = [folder]
    else:
        files = sorted(p for p in folder.rglob("*.parquet") if p.name.split("-")[0].split(".")[0] == split)
    if not files:
        raise EvalError(f"no {split!r} Parquet files under {folder}")
    rows: list[dict] = []
    for f in files:
        for row in pq.read_table(f).to_pylist():
            row["_file"] = f
            rows.append(row)
    return rows


def image_ref(cell: Any, root: Path) -> ImageRef:
    """An image cell as Hugging Face stores it — {"bytes", "path"}, raw bytes, or a file path."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        cell = cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, str) and cell:
        path = Path(cell) if os.path.isabs(cell) else root / cell
        if path.is_file():
            return str(path)
        raise EvalError(f"image not found: {path}")
    raise EvalError(f"not an image cell: {type(cell).__name__}")


def image_size(ref: ImageRef) -> tuple[int, int]:
    """(width, height) from the header only."""
    from PIL import Image

    with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as im:
        return im.size


def with_image(text: str, n: int = 1) -> str:
    """The prompt with its images first (the release's layout)."""
    return "<image>\n" * n + text


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]
