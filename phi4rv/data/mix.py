"""Training mixtures: datasets combined with target weights and a think ratio, split into train
and held-out sets with no image on both sides, written as Parquet shards with a manifest.

The plan: dataset i contributes `T * w_i` samples of which `t_i` are think samples (assistant
answer starting with `<think>`), with `sum t_i = think_ratio * T`. Without `total`, T is the largest
size reachable without repeating a sample; with `total`, datasets too small are repeated.
Held-out: samples are grouped by image content (decoded pixels; samples that share any image are
one group) and whole groups go to one side, chosen by a seeded hash of the group.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from phi4rv.data.formats import Sample, load_image_bytes, mode_of, read_samples, write_parquet
from phi4rv.processing.chat import IMAGE_TOKEN
from phi4rv.processing.image import ImageError, ImageProcessorConfig, load_image, naflex_size


@dataclass
class MixConfig:
    datasets: list[tuple[str, float]]  # (path, weight); weights are normalised
    think_ratio: float | None = 0.2  # None keeps each dataset's own ratio
    heldout: float = 0.1
    validation: float = 0.0  # a share for `val/` (what settings are tuned on), apart from `heldout/` (what is reported)
    total: int | None = None  # None: as many as possible without repeats
    seed: int = 0
    shard_size: int = 1000
    tokenizer: str | None = None  # a tokenizer folder for exact text-token counts


@dataclass
class Plan:
    name: str
    weight: float
    available: dict[str, int]
    take: dict[str, int] = field(default_factory=dict)
    repeated: int = 0


def dataset_name(path: str | Path) -> str:
    p = Path(path)
    return p.name if p.is_dir() else p.stem


def answer_mode(s: Sample) -> str:
    answers = s.answers()
    return mode_of(answers[-1]) if answers else "nothink"


# ---- planning --------------------------------------------------------------------------------


def _split_int(total: int, shares: list[float]) -> list[int]:
    """Integers proportional to `shares` summing to `total` (largest remainder)."""
    s = sum(shares)
    if total <= 0 or s <= 0:
        return [0] * len(shares)
    raw = [total * x / s for x in shares]
    out = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (out[i] - raw[i], i))[: total - sum(out)]:
        out[i] += 1
    return out


def _allocate(T: int, weights: list[float], avail: list[tuple[int, int]], ratio: float | None,
              repeats: bool) -> list[tuple[int, int]] | None:
    """(think, nothink) counts per dataset for a mixture of T samples, or None if impossible."""
    sizes = _split_int(T, weights)
    if ratio is None:
        out = []
        for s, (k, n) in zip(sizes, avail):
            if (k + n == 0 and s) or (not repeats and s > k + n):
                return None
            t = _split_int(s, [k, n])[0]
            out.append((t, s - t))
        return out
    lo, hi = [], []
    for s, (k, n) in zip(sizes, avail):
        if repeats:
            lo.append(s if n == 0 else 0)
            hi.append(s if k > 0 else 0)
        else:
            if s > k + n:
                return None
            lo.append(max(0, s - n))
            hi.append(min(s, k))
    target = round(ratio * T)
    if not sum(lo) <= target <= sum(hi) or any(a > b for a, b in zip(lo, hi)):
        return None
    extra = _split_int(target - sum(lo), [b - a for a, b in zip(lo, hi)])
    think = [a + e for a, e in zip(lo, extra)]
    # rounding can push one over its cap; move the excess to others with room
    for i in range(len(think)):
        while think[i] > hi[i]:
            j = next(j for j in range(len(think)) if think[j] < hi[j])
            think[i] -= 1
            think[j] += 1
    return [(t, s - t) for t, s in zip(think, sizes)]


def plan_mixture(avail: list[tuple[int, int]], weights: list[float], ratio: float | None,
                 total: int | None) -> list[tuple[int, int]]:
    """Counts per dataset: for `total` (repeating small datasets), else the largest mixture
    without repeats."""
    think, nothink = sum(k for k, _ in avail), sum(n for _, n in avail)
    if ratio is not None and ((ratio > 0 and think == 0) or (ratio < 1 and nothink == 0)):
        raise ValueError(f"think ratio {ratio} is impossible: the datasets hold {think} think and {nothink} nothink samples "
                         f"(--think-ratio -1 keeps their own ratio)")
    if total is not None:
        alloc = _allocate(total, weights, avail, ratio, repeats=True)
        if alloc is None:
            have = sum(k for k, _ in avail), sum(n for _, n in avail)
            raise ValueError(f"cannot build {total} samples with think ratio {ratio}: the datasets hold "
                             f"{have[0]} think and {have[1]} nothink samples")
        return alloc
    lo, hi = 0, sum(k + n for k, n in avail)
    while lo < hi:  # feasibility is monotone in T up to rounding; checked again below
        mid = (lo + hi + 1) // 2
        if _allocate(mid, weights, avail, ratio, repeats=False) is not None:
            lo = mid
        else:
            hi = mid - 1
    T = lo
    while T > 0 and _allocate(T, weights, avail, ratio, repeats=False) is None:
        T -= 1
    if T == 0:
        raise ValueError(f"no mixture is possible with think ratio {ratio}: "
                         f"{sum(k for k, _ in avail)} think and {sum(n for _, n in avail)} nothink samples")
    return _allocate(T, weights, avail, ratio, repeats=False)


def _draw(pool: list[Sample], k: int, rng: random.Random) -> tuple[list[Sample], int]:
    """k samples from pool: without replacement while it lasts, then repeats with fresh ids."""
    order = list(pool)
    rng.shuffle(order)
    out = order[:k]
    repeats = 0
    while len(out) < k:
        s = rng.choice(pool)
        repeats += 1
        out.append(replace(s, id=f"{s.id}~r{repeats}"))
    return out, repeats


# ---- held-out split --------------------------------------------------------------------------


def image_key(ref: bytes | str) -> str:
    """Content hash of an image's decoded pixels (re-encodings of one image share it)."""
    try:
        img = load_image(load_image_bytes(ref))
        h = hashlib.sha1(f"{img.width}x{img.height}".encode())
        h.update(img.tobytes())
        return "img:" + h.hexdigest()
    except (ImageError, OSError):
        return "raw:" + hashlib.sha1(load_image_bytes(ref) if isinstance(ref, bytes) else str(ref).encode()).hexdigest()


def _question_key(s: Sample) -> str:
    text = " ".join(m["content"] for m in s.messages if m["role"] == "user").lower()
    return "q:" + hashlib.sha1(" ".join(text.split()).encode()).hexdigest()


def split_heldout(samples: list[Sample], fraction: float, seed: int,
                  keys: list[list[str]] | None = None) -> tuple[list[Sample], list[Sample]]:
    """(train, heldout): samples sharing an image (or, without images, a question) stay together."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    if keys is None:
        keys = [[image_key(r) for r in s.images] or [_question_key(s)] for s in tqdm(samples, desc="hashing images", leave=False)]
    parent: dict[str, str] = {}

    def find(k: str) -> str:
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for ks in keys:
        for k in ks[1:]:
            a, b = find(ks[0]), find(k)
            if a != b:
                parent[max(a, b)] = min(a, b)
    train, held = [], []
    for s, ks in zip(samples, keys):
        root = find(ks[0])
        u = int.from_bytes(hashlib.sha256(f"{seed}:{root}".encode()).digest()[:8], "big") / 2**64
        (held if u < fraction else train).append(s)
    return train, held


# ---- summaries -------------------------------------------------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]")
PATCH_BINS = (256, 512, 1024, 2048, 3600)


def _text_tokens(s: Sample, tokenizer: Any | None) -> int:
    text = "\n".join(m["content"].replace(IMAGE_TOKEN, " ") for m in s.messages)
    return len(tokenizer.encode(text)) if tokenizer is not None else len(_WORD.findall(text))


def _patches(ref: bytes | str, cfg: ImageProcessorConfig) -> int | None:
    try:
        with Image.open(io.BytesIO(load_image_bytes(ref))) as im:  # header only
            w, h = im.size
    except Exception:
        return None
    H, W = naflex_size(h, w, cfg)
    return (H // cfg.patch_size) * (W // cfg.patch_size)


class Summary:
    """Running counts per task, mode, task x mode and source; text tokens; image patch counts."""

    def __init__(self, tokenizer: Any | None = None, image_cfg: ImageProcessorConfig | None = None):
        self.tokenizer, self.cfg = tokenizer, image_cfg or ImageProcessorConfig()
        self.tasks, self.modes, self.sources, self.per_image = Counter(), Counter(), Counter(), Counter()
        self.task_modes: dict[str, Counter] = {}
        self.tokens: list[int] = []
        self.patches: list[int] = []
        self.unreadable = 0

    def add(self, s: Sample) -> None:
        task, mode = str(s.meta.get("task", "unknown")), answer_mode(s)
        self.tasks[task] += 1
        self.modes[mode] += 1
        self.task_modes.setdefault(task, Counter())[mode] += 1
        self.sources[str(s.meta.get("source", "unknown"))] += 1
        self.per_image[str(len(s.images)) if len(s.images) < 4 else "4+"] += 1
        self.tokens.append(_text_tokens(s, self.tokenizer))
        for ref in s.images:
            p = _patches(ref, self.cfg)
            if p is None:
                self.unreadable += 1
            else:
                self.patches.append(p)

    def result(self) -> dict[str, Any]:
        n, tokens, patches = len(self.tokens), self.tokens, self.patches
        hist, lo = {}, 0
        for hi in PATCH_BINS:
            hist[f"{lo + 1}-{hi}"] = sum(1 for p in patches if lo < p <= hi)
            lo = hi
        return {
            "samples": n,
            "tasks": dict(sorted(self.tasks.items())),
            "modes": dict(sorted(self.modes.items())),
            "think_ratio": round(self.modes["think"] / n, 4) if n else 0.0,
            "task_modes": {t: dict(sorted(c.items())) for t, c in sorted(self.task_modes.items())},
            "sources": dict(sorted(self.sources.items())),
            "images_per_sample": dict(sorted(self.per_image.items())),
            "text_tokens": {"total": sum(tokens), "mean": round(sum(tokens) / n, 1) if n else 0.0,
                            "max": max(tokens, default=0),
                            "method": "tokenizer" if self.tokenizer is not None else "regex words"},
            "image_patches": {"images": len(patches), "total": sum(patches),
                              "mean": round(sum(patches) / len(patches), 1) if patches else 0.0,
                              "max": max(patches, default=0), "histogram": hist, "unreadable": self.unreadable},
        }


def summarize(samples: Iterable[Sample], tokenizer: Any | None = None,
              image_cfg: ImageProcessorConfig | None = None) -> dict[str, Any]:
    acc = Summary(tokenizer, image_cfg)
    for s in samples:
        acc.add(s)
    return acc.result()


def format_summary(summary: dict[str, Any], title: str = "") -> str:
    lines = [title] if title else []
    s = summary
    modes = ", ".join(f"{k} {v}" for k, v in s["modes"].items())
    lines.append(f"samples {s['samples']}, think ratio {s['think_ratio']:.3f} ({modes})")
    lines.append(f"text tokens ({s['text_tokens']['method']}): total {s['text_tokens']['total']:,}, "
                 f"mean {s['text_tokens']['mean']}, max {s['text_tokens']['max']}")
    ip = s["image_patches"]
    lines.append(f"images {ip['images']} (unreadable {ip['unreadable']}), patches total {ip['total']:,}, "
                 f"mean {ip['mean']}, max {ip['max']}")
    lines.append("patch histogram: " + ", ".join(f"{k}: {v}" for k, v in ip["histogram"].items()))
    lines.append("images per sample: " + ", ".join(f"{k}: {v}" for k, v in s["images_per_sample"].items()))
    lines.append("sources: " + ", ".join(f"{k} {v}" for k, v in s["sources"].items()))
    width = max((len(t) for t in s["task_modes"]), default=4)
    lines.append(f"{'task':<{width}}  {'total':>7}  {'think':>7}  {'nothink':>7}")
    for t, c in s["task_modes"].items():
        lines.append(f"{t:<{width}}  {sum(c.values()):>7}  {c.get('think', 0):>7}  {c.get('nothink', 0):>7}")
    return "\n".join(lines)


# ---- the whole job ---------------------------------------------------------------------------


def build_mixture(cfg: MixConfig) -> tuple[list[Sample], list[Plan]]:
    if not cfg.datasets:
        raise ValueError("no datasets given")
    if any(w <= 0 for _, w in cfg.datasets):
        raise ValueError("dataset weights must be positive")
    if cfg.think_ratio is not None and not 0 <= cfg.think_ratio <= 1:
        raise ValueError(f"think ratio must be in [0, 1], got {cfg.think_ratio}")
    names = [dataset_name(p) for p, _ in cfg.datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"two datasets share a name: {names}")
    pools = []
    for (path, _), name in zip(cfg.datasets, names):
        think, nothink = [], []
        for s in tqdm(read_samples(path), desc=f"reading {name}", leave=False):
            (think if answer_mode(s) == "think" else nothink).append(s)
        pools.append((think, nothink))
    weights = [w for _, w in cfg.datasets]
    alloc = plan_mixture([(len(t), len(n)) for t, n in pools], weights, cfg.think_ratio, cfg.total)
    rng = random.Random(cfg.seed)
    mixed, plans = [], []
    total_w = sum(weights)
    for (think, nothink), (t, k), name, w in zip(pools, alloc, names, weights):
        a, ra = _draw(think, t, random.Random(rng.getrandbits(64)))
        b, rb = _draw(nothink, k, random.Random(rng.getrandbits(64)))
        for s in a + b:
            s.meta = {**s.meta, "mix_source": name}
        mixed += a + b
        plans.append(Plan(name, w / total_w, {"think": len(think), "nothink": len(nothink)},
                          {"think": t, "nothink": k}, ra + rb))
    rng.shuffle(mixed)
    return mixed, plans


def _write_split(samples: list[Sample], out: Path, shard_size: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.parquet"):
        old.unlink()
    names = []
    for k in range(0, max(1, len(samples)), shard_size):
        chunk = samples[k : k + shard_size]
        if not chunk:
            break
        name = f"shard-{k // shard_size:05d}.parquet"
        write_parquet(chunk, out / name)
        names.append(name)
    return names


def write_mixture(cfg: MixConfig, out: str | Path) -> dict[str, Any]:
    """Build the mixture, split it, write `out/train/`, `out/heldout/` (and with `validation`,
    `out/val/`; no image in two splits) and `out/manifest.json`."""
    out = Path(out)
    if not 0 <= cfg.validation < 1 - cfg.heldout:
        raise ValueError(f"validation share must be in [0, {1 - cfg.heldout:g}), got {cfg.validation}")
    mixed, plans = build_mixture(cfg)
    train, held = split_heldout(mixed, cfg.heldout, cfg.seed)
    splits = [("train", train), ("heldout", held)]
    if cfg.validation:
        train, val = split_heldout(train, cfg.validation / (1 - cfg.heldout), cfg.seed + 1)
        splits = [("train", train), ("heldout", held), ("val", val)]
    tokenizer = None
    if cfg.tokenizer:
        from phi4rv.processing.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(cfg.tokenizer)
    manifest: dict[str, Any] = {"config": asdict(cfg), "datasets": [asdict(p) for p in plans], "splits": {}}
    for split, samples in splits:
        shards = _write_split(samples, out / split, cfg.shard_size)
        manifest["splits"][split] = {"shards": shards, **summarize(samples, tokenizer)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
