"""Training/eval samples and the on-disk formats people already have.

One in-memory form, `Sample`: OpenAI-style messages whose string contents hold `<image>` tags,
plus the images those tags refer to, in order. Readers accept:

- LLaVA JSON / JSONL: `{"id", "image": "a.jpg" | "images": [...], "conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}`
  (image paths relative to `image_root`, default the file's folder);
- OpenAI `messages` JSONL: `{"messages": [{"role", "content": str | [{"type": "text"|"image_url"|"image", ...}]}]}`
  with images as data URIs or local paths;
- Parquet shards written by `write_parquet`: columns `id`, `messages` (JSON), `images` (list of
  encoded image bytes), `meta` (JSON).

A reasoning answer is `<think>…</think> answer`; a direct answer starts with NOTHINK_TOKEN
(`mode_of` tells which). Images are kept as paths or bytes and decoded only when used.
`read_samples` reads a dataset whole; `StreamReader` reads .jsonl / Parquet incrementally with
resumable positions (streamed training).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from phi4rv.processing.chat import IMAGE_TOKEN, content_text
from phi4rv.processing.reasoning import NOTHINK_TOKEN, THINK_START

ImageRef = Union[bytes, str]  # encoded bytes, or a path to a file
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DatasetFormatError(ValueError):
    pass


@dataclass
class Sample:
    id: str
    messages: list[dict[str, str]]  # [{"role": "user"|"assistant"|"system", "content": str with <image> tags}]
    images: list[ImageRef] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # task, source, scene, ...

    @property
    def num_image_tags(self) -> int:
        return sum(m["content"].count(IMAGE_TOKEN) for m in self.messages)

    def answers(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "assistant"]


def mode_of(answer: str) -> str:
    """"think" for `<think>…` answers, "nothink" otherwise (marked or not)."""
    return "think" if answer.lstrip().startswith(THINK_START) else "nothink"


def mark_nothink(answer: str) -> str:
    """Direct answers carry the nothink marker in front, as the release's data does."""
    if mode_of(answer) == "think" or answer.startswith(NOTHINK_TOKEN):
        return answer
    return NOTHINK_TOKEN + answer


def load_image_bytes(ref: ImageRef) -> bytes:
    if isinstance(ref, bytes):
        return ref
    return Path(ref).read_bytes()


# ---- readers ---------------------------------------------------------------------------------


def _records(path: Path) -> Iterator[dict]:
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise DatasetFormatError(f"{path}: a .json dataset must hold a list of samples")
        yield from data
        return
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetFormatError(f"{path}:{i}: invalid JSON ({e.msg})") from None


def _from_llava(rec: dict, root: Path, idx: int) -> Sample:
    images = rec.get("images", [rec["image"]] if "image" in rec else [])
    if isinstance(images, str):
        images = [images]
    messages = []
    for turn in rec["conversations"]:
        role = _ROLES.get(turn.get("from", ""))
        if role is None:
            raise DatasetFormatError(f"sample {rec.get('id', idx)}: unknown speaker {turn.get('from')!r}")
        messages.append({"role": role, "content": turn["value"]})
    meta = {k: v for k, v in rec.items() if k not in ("id", "image", "images", "conversations")}
    return Sample(str(rec.get("id", idx)), messages, [str(root / p) for p in images], meta)


def _image_from_url(url: str, root: Path) -> ImageRef:
    if url.startswith("data:"):
        _, _, payload = url.partition(",")
        return base64.b64decode(payload)
    if url.startswith(("http://", "https://")):
        raise DatasetFormatError(f"remote image URLs are not fetched: {url[:60]}")
    return str(root / url.removeprefix("file://"))


def _from_openai(rec: dict, root: Path, idx: int) -> Sample:
    messages, images = [], []
    for m in rec["messages"]:
        content = m["content"]
        try:
            text = content_text(content)
        except ValueError as e:
            raise DatasetFormatError(f"sample {rec.get('id', idx)}: {e}") from None
        for part in content if isinstance(content, list) else ():
            if part["type"] == "image_url":
                images.append(_image_from_url(part["image_url"]["url"], root))
            elif part["type"] == "image":
                images.append(_image_from_url(part.get("image", part.get("path")), root))
        messages.append({"role": m["role"], "content": text})
    meta = {k: v for k, v in rec.items() if k not in ("id", "messages")}
    return Sample(str(rec.get("id", idx)), messages, images, meta)


def _parquet_sample(row: dict) -> Sample:
    return Sample(row["id"], json.loads(row["messages"]), list(row["images"] or []), json.loads(row["meta"] or "{}"))


def read_parquet(path: Path) -> Iterator[Sample]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for row in table.to_pylist():
        yield _parquet_sample(row)


def _to_sample(rec: Any, path: Path, root: Path, i: int) -> Sample:
    if not isinstance(rec, dict):
        raise DatasetFormatError(f"{path}: sample {i} is not an object")
    try:
        if "conversations" in rec:
            return _from_llava(rec, root, i)
        if "messages" in rec:
            return _from_openai(rec, root, i)
        raise DatasetFormatError(f"{path}: sample {rec.get('id', i)} has neither 'conversations' nor 'messages'")
    except KeyError as e:
        raise DatasetFormatError(f"{path}: sample {rec.get('id', i)} lacks field {e.args[0]!r}") from None


def read_samples(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Iterator[Sample]:
    """Samples from a .json / .jsonl / .parquet file (or a folder of .parquet shards)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if path.is_dir():
        shards = sorted(path.glob("*.parquet"))
        if not shards:
            raise DatasetFormatError(f"{path}: no .parquet shards")
        for shard in shards:
            yield from read_parquet(shard)
        return
    if path.suffix == ".parquet":
        yield from read_parquet(path)
        return
    if path.suffix not in (".json", ".jsonl"):
        raise DatasetFormatError(f"{path}: unsupported dataset format (use .json, .jsonl or .parquet)")
    root = Path(image_root) if image_root else path.parent
    for i, rec in enumerate(_records(path)):
        yield _to_sample(rec, path, root, i)


Position = tuple[int, int, int]  # JSON lines: (0, byte offset of the line, record index); Parquet: (shard, row group, row)


class StreamReader:
    """One dataset read incrementally, each sample with its `Position`: a JSON-lines file a line at a
    time, Parquet one row group at a time, so memory does not grow with the dataset. `read(after=p)`
    continues just after the sample at p (an exact resume); `read_at` re-reads samples by position.
    A .json file (one JSON array) cannot be read incrementally: convert it to .jsonl."""

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"dataset not found: {self.path}")
        self.root = Path(image_root) if image_root else self.path.parent
        if self.path.is_dir():
            self.files = sorted(self.path.glob("*.parquet"))
            if not self.files:
                raise DatasetFormatError(f"{self.path}: no .parquet shards")
        elif self.path.suffix in (".parquet", ".jsonl"):
            self.files = [self.path]
        elif self.path.suffix == ".json":
            raise DatasetFormatError(f"{self.path}: a .json array cannot be streamed; write it as JSON lines (.jsonl, one sample per line)")
        else:
            raise DatasetFormatError(f"{self.path}: unsupported dataset format (use .jsonl or .parquet)")
        self.parquet = self.files[0].suffix == ".parquet"

    def read(self, after: Position | None = None) -> Iterator[tuple[Position, Sample]]:
        """Every sample from the start (or from just after `after`) to the end of the dataset."""
        if self.parquet:
            yield from self._read_parquet(after)
        else:
            yield from self._read_lines(after)

    def _read_lines(self, after: Position | None) -> Iterator[tuple[Position, Sample]]:
        with open(self.path, "rb") as f:
            index = 0
            if after is not None:
                f.seek(after[1])
                f.readline()
                index = after[2] + 1
            while True:
                offset = f.tell()
                line = f.readline()
                if not line:
                    return
                if line.strip():
                    yield (0, offset, index), self._line_sample(line, offset, index)
                    index += 1

    def _line_sample(self, line: bytes, offset: int, index: int) -> Sample:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{self.path}: record {index} (byte {offset}): invalid JSON ({e.msg})") from None
        return _to_sample(rec, self.path, self.root, index)

    def _row_group(self, shard: int, group: int) -> list[dict]:
        import pyarrow.parquet as pq

        with pq.ParquetFile(self.files[shard]) as f:
            return f.read_row_group(group).to_pylist()

    def _read_parquet(self, after: Position | None) -> Iterator[tuple[Position, Sample]]:
        import pyarrow.parquet as pq

        shard, group, row = (0, 0, 0) if after is None else (after[0], after[1], after[2] + 1)
        for s in range(shard, len(self.files)):
            with pq.ParquetFile(self.files[s]) as f:
                groups = f.num_row_groups
            for g in range(group if s == shard else 0, groups):
                rows = self._row_group(s, g)
                for r in range(row if (s, g) == (shard, group) else 0, len(rows)):
                    yield (s, g, r), _parquet_sample(rows[r])
                del rows

    def read_at(self, positions: list[Position]) -> list[Sample]:
        """The samples at `positions` (each Parquet row group read once)."""
        if not self.parquet:
            with open(self.path, "rb") as f:
                out = []
                for pos in positions:
                    f.seek(pos[1])
                    out.append(self._line_sample(f.readline(), pos[1], pos[2]))
                return out
        groups: dict[tuple[int, int], list[dict]] = {}
        for shard, group, _ in positions:
            if (shard, group) not in groups:
                groups[shard, group] = self._row_group(shard, group)
        return [_parquet_sample(groups[s, g][r]) for s, g, r in positions]


# ---- writers ---------------------------------------------------------------------------------


def write_parquet(samples: list[Sample], path: str | os.PathLike) -> None:
    """One Parquet shard with image bytes embedded (written to a temp name, then renamed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    table = pa.table(
        {
            "id": [s.id for s in samples],
            "messages": [json.dumps(s.messages, ensure_ascii=False) for s in samples],
            "images": pa.array([[load_image_bytes(r) for r in s.images] for s in samples], type=pa.list_(pa.binary())),
            "meta": [json.dumps(s.meta, ensure_ascii=False) for s in samples],
        }
    )
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_jsonl(samples: list[Sample], path: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> None:
    """OpenAI-messages JSONL; byte images are written under `image_dir` (default `<path>_images/`)."""
    path = Path(path)
    image_dir = Path(image_dir) if image_dir else path.with_name(path.stem + "_images")
    lines = []
    for s in samples:
        refs = []
        for k, ref in enumerate(s.images):
            if isinstance(ref, bytes):
                image_dir.mkdir(parents=True, exist_ok=True)
                file = image_dir / f"{s.id}_{k}.png"
                file.write_bytes(ref)
                ref = str(file)
            refs.append(os.path.relpath(ref, path.parent))
        images = iter(refs)
        messages = []
        for m in s.messages:
            parts, pieces = [], m["content"].split(IMAGE_TOKEN)
            for j, piece in enumerate(pieces):
                if j:
                    parts.append({"type": "image_url", "image_url": {"url": next(images)}})
                    piece = piece.removeprefix("\n")
                if piece:
                    parts.append({"type": "text", "text": piece})
            messages.append({"role": m["role"], "content": parts if len(pieces) > 1 else m["content"]})
        lines.append(json.dumps({"id": s.id, "messages": messages, **s.meta}, ensure_ascii=False))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
