"""Curation: check, deduplicate, triage, repair and (optionally) teacher-verify datasets.

Every sample lands in one of the paper's four classes (DESIGN.md §4):

- keep                   nothing wrong found;
- fixable_format         the answer has the wrong form but a safe rewrite exists (kept, repaired);
- wrong_answer           the answer is missing, malformed beyond repair, disagrees with the
                         sample's own ground truth (`meta["answer"]`) or with a teacher;
- bad_question_or_image  an image that does not decode, is too large or too small, an `<image>`
                         count that does not match the images, a missing question.

Synthetic samples are drawn again from their seed (`phi4rv.data.synth.regenerate`): a scene,
question or answer (in the message or in `meta`) other than the generator's is caught there. Every
answer must have its mode's structure (`verify.think_structure`). Samples with the same pixels and
question that agree are exact duplicates (one kept); when they disagree, the answer re-derived from
the scene decides, never the order (`resolve_duplicates`). Near duplicates (image dHash within
`near_duplicate_bits`, same question, same answer) are removed apart from the first. With a
teacher, a share of each dataset is answered by the teacher; a dataset whose error rate exceeds
`max_error_rate` is dropped whole. Output: clean shards, `removed.jsonl`, `report.md`,
`report.json`, `removals.png`, and `wrong_answers/` (the wrong-answer samples, shards to hand to
`phi4rv data teacher` for regeneration).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from phi4rv.data import verify
from phi4rv.data.formats import DatasetFormatError, Sample, read_samples, write_parquet
from phi4rv.data.mix import dataset_name
from phi4rv.data.synth import regenerate
from phi4rv.data.teacher import TeacherConfig, teacher_answers
from phi4rv.processing.answers import normalize_text
from phi4rv.processing.chat import IMAGE_TOKEN
from phi4rv.processing.image import ImageError, ImageProcessorConfig, load_image
from phi4rv.processing.reasoning import NOTHINK_TOKEN

KEEP, FIX, WRONG, BAD = "keep", "fixable_format", "wrong_answer", "bad_question_or_image"
CLASSES = (KEEP, FIX, WRONG, BAD)
CHECKABLE = ("number", "choice", "box", "order")  # answer types a teacher's answer can be compared on


@dataclass
class CurateConfig:
    max_pixels: int = ImageProcessorConfig.max_pixels
    min_side: int = 8  # pixels; smaller images are unusable
    max_aspect: float = 50.0
    dedup: bool = True
    near_duplicate_bits: int = 4  # dHash Hamming distance counted as "near"; -1 = exact duplicates only
    repair: bool = True  # False: fixable formatting is dropped instead
    teacher: TeacherConfig | None = None
    max_error_rate: float = 0.2  # teacher-checked error rate above which a dataset is dropped
    verify_fraction: float = 1.0  # share of each dataset's surviving samples the teacher checks
    shard_size: int = 1000
    seed: int = 0
    image_root: Path | None = None
    examples: int = 3  # examples per reason in the report


@dataclass
class Verdict:
    cls: str
    reasons: list[str] = field(default_factory=list)
    detail: str = ""
    sample: Sample | None = None  # the sample to keep (repaired where needed)
    image_keys: list[str] = field(default_factory=list)  # exact pixel hashes
    dhashes: list[int] = field(default_factory=list)
    aspects: list[float] = field(default_factory=list)  # width / height
    verified: bool = False  # the answer was re-derived from the sample's scene (synthetic data)


# ---- image fingerprints ----------------------------------------------------------------------


def dhash(img: Image.Image, size: int = 8) -> int:
    """64-bit difference hash: is each pixel of a (size+1) x size greyscale thumbnail brighter than its right neighbour."""
    g = np.asarray(img.convert("L").resize((size + 1, size), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def normalize_question(s: Sample) -> str:
    text = " ".join(m["content"] for m in s.messages if m["role"] == "user").replace(IMAGE_TOKEN, " ")
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# ---- per-sample checks -----------------------------------------------------------------------


def _question_text(s: Sample) -> str:
    return " ".join(m["content"] for m in s.messages if m["role"] == "user").replace(IMAGE_TOKEN, "").strip()


def check_sample(s: Sample, cfg: CurateConfig) -> Verdict:
    """Triage one sample on its own (duplicates and teacher checks come later)."""
    # images
    keys, hashes, sizes = [], [], []
    if s.num_image_tags != len(s.images):
        return Verdict(BAD, ["image_count_mismatch"], f"{s.num_image_tags} <image> tags, {len(s.images)} images")
    for ref in s.images:
        try:
            img = load_image(ref, cfg.max_pixels)
        except (ImageError, OSError) as e:
            msg = str(e)
            reason = "image_too_large" if "too large" in msg else "image_missing" if "not found" in msg else "image_unreadable"
            return Verdict(BAD, [reason], str(e))
        w, h = img.size
        if min(w, h) < cfg.min_side:
            return Verdict(BAD, ["image_too_small"], f"{w}x{h}")
        if max(w, h) / min(w, h) > cfg.max_aspect:
            return Verdict(BAD, ["image_aspect"], f"{w}x{h}")
        keys.append(hashlib.sha1(f"{w}x{h}".encode() + img.tobytes()).hexdigest())
        hashes.append(dhash(img))
        sizes.append((w, h))
    base = {"image_keys": keys, "dhashes": hashes, "aspects": [w / h for w, h in sizes]}
    # question and answer present
    if not any(m["role"] == "user" for m in s.messages) or len(_question_text(s)) < 2:
        return Verdict(BAD, ["missing_question"], "no question text", **base)
    answers = [i for i, m in enumerate(s.messages) if m["role"] == "assistant"]
    if not answers or not s.messages[answers[-1]]["content"].strip().removeprefix(NOTHINK_TOKEN).strip():
        return Verdict(WRONG, ["missing_answer"], "no answer", **base)
    # answer form
    messages = [dict(m) for m in s.messages]
    repairs: list[str] = []
    kind = s.meta.get("answer_type")
    for i in answers:
        a = messages[i]["content"]
        problem = verify.think_structure(a)
        if problem:
            return Verdict(WRONG, [problem], a[-80:], **base)
        if a != a.strip():
            messages[i]["content"] = a = a.strip()
            repairs.append("whitespace")
        if a.startswith(NOTHINK_TOKEN + NOTHINK_TOKEN):
            while a.startswith(NOTHINK_TOKEN):
                a = a.removeprefix(NOTHINK_TOKEN)
            messages[i]["content"] = a = NOTHINK_TOKEN + a
            repairs.append("repeated_marker")
        if not verify.final_answer(a):
            return Verdict(WRONG, ["empty_answer"], a[-80:], **base)
        if kind in verify.ANSWER_TYPES and i == answers[-1]:
            problem = verify.check_format(a, kind)
            if problem:
                fixed = verify.repair_format(a, kind, sizes[0] if len(sizes) == 1 else None, s.meta.get("choices"))
                if fixed is None:
                    return Verdict(WRONG, [problem], verify.final_answer(a)[:80], **base)
                messages[i]["content"] = fixed
                repairs.append(problem)
    # the sample's own ground truth, when it carries one (synthetic data, earlier curation)
    if "answer" in s.meta and kind in verify.ANSWER_TYPES:
        final = messages[answers[-1]]["content"]
        if not verify.check_sample(s.meta, final):
            return Verdict(WRONG, ["answer_mismatch"], f"says {verify.final_answer(final)[:60]!r}, "
                           f"ground truth {str(s.meta['answer'])[:60]!r}", **base)
    # a synthetic sample drawn again from its seed: its scene, question and answer as the generator derives them
    verified = False
    truth = regenerate(s.meta) if "scene" in s.meta else None
    if truth is not None:
        if _json(truth.meta["scene"]) != _json(s.meta.get("scene")):
            return Verdict(BAD, ["scene_mismatch"], "the scene is not the one its seed draws", **base)
        if normalize_question(truth) == normalize_question(s):  # another question: nothing to re-derive it from
            final = messages[answers[-1]]["content"]
            for said, reason in ((str(s.meta.get("answer", "")), "meta_answer_mismatch"), (final, "scene_answer_mismatch")):
                if not verify.check_sample(truth.meta, said):
                    return Verdict(WRONG, [reason], f"says {verify.final_answer(said)[:60]!r}, the scene's answer is "
                                   f"{truth.meta['answer'][:60]!r}", **base)
            verified = True
    if repairs:
        fixed = replace(s, messages=messages, meta={**s.meta, "repairs": repairs})
        return Verdict(FIX, repairs, "", fixed, verified=verified, **base)
    return Verdict(KEEP, [], "", s, verified=verified, **base)


def _json(x: Any) -> Any:
    return json.loads(json.dumps(x))


# ---- duplicates ------------------------------------------------------------------------------


class DuplicateIndex:
    """Exact (pixels + question) and near (dHash bands + question + answer) duplicate lookup.

    Near copies must also keep the aspect ratio (within 2%): re-encoded and resized copies do,
    while distinct text-rich pictures that look alike at 9x8 pixels (two receipts with the same
    store name asked for) usually don't. What a 9x8 thumbnail can't see stays a limit: two small
    rendered sums with the same answer on same-shaped canvases ("5 + 1", "3 + 3") count as near
    copies; `near_duplicate_bits=-1` keeps exact duplicates only."""

    def __init__(self, bits: int):
        self.bits = bits
        self.bands = bits + 1 if 0 <= bits <= 8 else 0  # pigeonhole: a match within `bits` shares a band
        self.exact: dict[str, str] = {}
        self.near: dict[tuple, list[tuple[list[int], list[float], str]]] = {}

    def _band_keys(self, question: str, answer: str, hashes: list[int]) -> list[tuple]:
        if not hashes:
            return [(question, answer)]
        width = 64 // self.bands
        keys = []
        for b in range(self.bands):
            shift = b * width
            mask = (1 << (width if b < self.bands - 1 else 64 - shift)) - 1
            keys.append((question, answer, b, tuple((h >> shift) & mask for h in hashes)))
        return keys

    def check_and_add(self, sid: str, question: str, answer: str, keys: list[str], hashes: list[int],
                      aspects: list[float]) -> tuple[str, str] | None:
        """(reason, id of the first copy) when a duplicate, else None (and remember this one)."""
        exact = hashlib.sha1("\x00".join([question, *keys] if keys else [question, answer]).encode()).hexdigest()
        if exact in self.exact:
            return "exact_duplicate", self.exact[exact]
        if self.bands and hashes:
            band_keys = self._band_keys(question, answer, hashes)
            for k in band_keys:
                for other, other_aspects, other_id in self.near.get(k, []):
                    if (len(other) == len(hashes)
                            and all(hamming(a, b) <= self.bits for a, b in zip(other, hashes))
                            and all(abs(math.log(a / b)) < 0.02 for a, b in zip(other_aspects, aspects))):
                        return "near_duplicate", other_id
            for k in band_keys:
                self.near.setdefault(k, []).append((hashes, aspects, sid))
        self.exact[exact] = sid
        return None


# ---- the whole job ---------------------------------------------------------------------------


def _example(s: Sample, detail: str) -> dict[str, str]:
    answers = s.answers()
    return {"id": s.id, "question": _question_text(s)[:160], "answer": (answers[-1] if answers else "")[-160:],
            "detail": detail}


def _teacher_check(kept: list[tuple[Sample, Verdict]], cfg: CurateConfig, name: str) -> dict[str, Any]:
    """Ask the teacher a share of the samples; mark disagreements as wrong answers."""
    def checkable_one(v: Verdict) -> bool:
        kind = v.sample.meta.get("answer_type")
        short = len(verify.final_answer(v.sample.answers()[-1]).split()) <= 6
        return kind in CHECKABLE or (kind == "text" and short)  # free-form text can't be compared

    checkable = [(s, v) for s, v in kept if checkable_one(v)]
    rng = random.Random(f"{cfg.seed}/{name}")
    chosen = [sv for sv in checkable if rng.random() < cfg.verify_fraction]
    answers = teacher_answers([v.sample for _, v in chosen], cfg.teacher)
    checked = wrong = failed = 0
    for s, v in chosen:
        said = answers.get(v.sample.id)
        if said is None:
            failed += 1
            continue
        checked += 1
        truth = verify.final_answer(v.sample.answers()[-1])
        meta = {**v.sample.meta, "answer": truth}
        if not verify.check_sample(meta, said, verify.Tolerance(rel=cfg.teacher.rel_tol, iou=cfg.teacher.iou)):
            wrong += 1
            v.cls, v.reasons, v.detail = WRONG, ["teacher_disagrees"], f"teacher says {said[:60]!r}, dataset {truth[:60]!r}"
    rate = wrong / checked if checked else None
    return {"checked": checked, "disagreed": wrong, "failed": failed, "error_rate": rate, "eligible": len(checkable)}


def check_dataset(path: Path, cfg: CurateConfig) -> tuple[list[tuple[Sample, Verdict]], str | None]:
    """Every sample of one dataset with its own verdict (duplicates come later, over all datasets)."""
    rows: list[tuple[Sample, Verdict]] = []
    error = None
    try:
        for s in tqdm(read_samples(path, cfg.image_root), desc=f"checking {dataset_name(path)}", unit="sample", leave=False):
            v = check_sample(s, cfg)
            if v.cls == FIX and not cfg.repair:
                v = Verdict(FIX, v.reasons, "repair disabled")
            rows.append((s, v))
    except (DatasetFormatError, FileNotFoundError, OSError) as e:
        error = str(e)
    return rows, error


def _final(v: Verdict) -> str:
    return normalize_text(verify.final_answer(v.sample.answers()[-1]))


def resolve_duplicates(rows: list[tuple[Sample, Verdict]], cfg: CurateConfig) -> None:
    """Mark duplicates and conflicts among the surviving rows (all datasets, in order), in place.

    Samples with the same image(s) and question form a group. When they agree on the answer, one is
    kept (a verified one where there is one) and the rest are exact duplicates. When they disagree,
    order decides nothing: the answers re-derived from the scene (`Verdict.verified`) decide, and
    the members that disagree with them are wrong answers; with no verified member, or verified
    members that disagree among themselves, the whole group is removed as `conflicting_answers`.
    Near duplicates (same question and answer, dHash within `near_duplicate_bits`) come after, the
    first in order kept."""
    live = [(s, v) for s, v in rows if v.cls in (KEEP, FIX) and v.sample is not None]
    groups: dict[str, list[Verdict]] = {}
    for _, v in live:
        q = normalize_question(v.sample)
        key = [q, *v.image_keys] if v.image_keys else [q, _final(v)]
        groups.setdefault(hashlib.sha1("\x00".join(key).encode()).hexdigest(), []).append(v)
    for group in groups.values():
        if len(group) == 1:
            continue
        ids = {id(v): v.sample.id for v in group}
        answers = {id(v): _final(v) for v in group}
        trusted = {answers[id(v)] for v in group if v.verified}
        if len(set(answers.values())) > 1 and len(trusted) != 1:
            listed = ", ".join(sorted(f"{ids[id(v)]}: {answers[id(v)][:30]!r}" for v in group))
            why = "no answer re-derived from the scene" if not trusted else "re-derived answers disagree"
            for v in group:
                v.cls, v.reasons, v.detail = WRONG, ["conflicting_answers"], f"same image and question ({why}): {listed}"[:300]
            continue
        answer = next(iter(trusted)) if trusted else answers[id(group[0])]
        agree = [v for v in group if answers[id(v)] == answer]
        keep = next((v for v in agree if v.verified), agree[0])
        for v in group:
            if v is keep:
                continue
            if answers[id(v)] == answer:
                v.cls, v.reasons, v.detail = "duplicate", ["exact_duplicate"], f"same as {ids[id(keep)]}"
            else:
                v.cls, v.reasons, v.detail = WRONG, ["conflicting_answers"], (
                    f"says {answers[id(v)][:40]!r}; {ids[id(keep)]} (same image and question) says {answer[:40]!r}, "
                    "re-derived from the scene")
    if cfg.near_duplicate_bits < 0:
        return
    near = DuplicateIndex(cfg.near_duplicate_bits)
    for s, v in live:
        if v.cls not in (KEEP, FIX):
            continue
        hit = near.check_and_add(s.id, normalize_question(v.sample), _final(v), v.image_keys, v.dhashes, v.aspects)
        if hit:
            v.cls, v.reasons, v.detail = "duplicate", [hit[0]], f"same as {hit[1]}"


def finish_dataset(path: Path, rows: list[tuple[Sample, Verdict]], error: str | None, cfg: CurateConfig
                   ) -> tuple[list[Sample], dict[str, Any], list[dict], list[Sample]]:
    name = dataset_name(path)
    survivors = [(s, v) for s, v in rows if v.cls in (KEEP, FIX) and v.sample is not None]
    teacher = None
    dropped = error is not None and not rows
    if cfg.teacher is not None and survivors:
        teacher = _teacher_check(survivors, cfg, name)
        if teacher["error_rate"] is not None and teacher["error_rate"] > cfg.max_error_rate:
            dropped = True
    classes = Counter(v.cls for _, v in rows if v.cls != "duplicate")
    reasons = Counter(r for _, v in rows if v.cls != KEEP for r in v.reasons)
    by_class: dict[str, Counter] = {}
    for _, v in rows:
        for r in v.reasons:
            by_class.setdefault(v.cls, Counter())[r] += 1
    examples: dict[str, list] = {}
    removed = []
    kept: list[Sample] = []
    to_regenerate: list[Sample] = []  # wrong answers on good images and questions: a teacher's job
    for s, v in rows:
        keep = v.cls in (KEEP, FIX) and v.sample is not None and not dropped
        if keep:
            meta = {**v.sample.meta, "curation": {"class": v.cls, **({"repairs": v.reasons} if v.cls == FIX else {})}}
            meta.setdefault("source", name)
            kept.append(replace(v.sample, meta=meta))
        for r in v.reasons:
            if len(examples.setdefault(r, [])) < cfg.examples:
                examples[r].append(_example(s, v.detail))
        if not keep:
            removed.append({"id": s.id, "dataset": name, "class": v.cls,
                            "reasons": v.reasons or ["dataset_dropped"], "detail": v.detail})
        if v.cls == WRONG:
            meta = {**s.meta, "curation": {"class": WRONG, "reasons": v.reasons}}
            meta.setdefault("source", name)
            to_regenerate.append(replace(s, meta=meta))
    report = {
        "path": str(path),
        "total": len(rows),
        "kept": len(kept),
        "dropped": dropped,
        "read_error": error,
        "classes": {c: classes.get(c, 0) for c in CLASSES},
        "duplicates": sum(1 for _, v in rows if v.cls == "duplicate"),
        "reasons": dict(reasons.most_common()),
        "reasons_by_class": {c: dict(n.most_common()) for c, n in sorted(by_class.items())},
        "teacher": teacher,
        "examples": examples,
    }
    if dropped and teacher is not None:
        report["drop_reason"] = (f"teacher error rate {teacher['error_rate']:.1%} > {cfg.max_error_rate:.1%}")
    elif dropped:
        report["drop_reason"] = f"unreadable: {error}"
    report["to_regenerate"] = len(to_regenerate)
    return kept, report, removed, to_regenerate


def curate(inputs: list[str | Path], cfg: CurateConfig, out: str | Path) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.parquet"):
        old.unlink()
    names = [dataset_name(p) for p in inputs]
    if len(set(names)) != len(names):
        raise ValueError(f"two inputs share a name: {names}")
    report: dict[str, Any] = {"config": _config_dict(cfg), "datasets": {}, "shards": []}
    checked = [check_dataset(Path(path), cfg) for path in inputs]
    if cfg.dedup:  # over all datasets: a copy in a later dataset is a duplicate too
        resolve_duplicates([row for rows, _ in checked for row in rows], cfg)
    buf: list[Sample] = []
    wrong: list[Sample] = []
    regen_dir = out / "wrong_answers"
    for old in regen_dir.glob("shard-*.parquet"):
        old.unlink()
    with open(out / "removed.jsonl", "w") as rem:
        for path, name, (rows, error) in zip(inputs, names, checked):
            kept, rep, removed, to_regenerate = finish_dataset(Path(path), rows, error, cfg)
            report["datasets"][name] = rep
            for r in removed:
                rem.write(json.dumps(r) + "\n")
            for s in kept:
                buf.append(s)
                if len(buf) >= cfg.shard_size:
                    report["shards"].append(_flush(buf, out, len(report["shards"])))
            wrong += to_regenerate
    if buf:
        report["shards"].append(_flush(buf, out, len(report["shards"])))
    if wrong:  # for `phi4rv data teacher out/wrong_answers ...` (with --vote where no answer is trusted)
        regen_dir.mkdir(exist_ok=True)
        for k in range(0, len(wrong), cfg.shard_size):
            write_parquet(wrong[k : k + cfg.shard_size], regen_dir / f"shard-{k // cfg.shard_size:05d}.parquet")
    report["kept"] = sum(d["kept"] for d in report["datasets"].values())
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    plot_removals(report, out / "removals.png")
    return report


def _flush(buf: list[Sample], out: Path, k: int) -> str:
    name = f"shard-{k:05d}.parquet"
    write_parquet(buf, out / name)
    buf.clear()
    return name


def _config_dict(cfg: CurateConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["image_root"] = str(cfg.image_root) if cfg.image_root else None
    if cfg.teacher is not None:
        d["teacher"] = {"endpoint": cfg.teacher.endpoint, "model": cfg.teacher.model}  # never the key
    return d


# ---- report ----------------------------------------------------------------------------------


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# Curation report", ""]
    lines.append("| dataset | in | kept | keep | fixable_format | wrong_answer | bad_question_or_image | duplicates "
                 "| teacher error rate | verdict |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, d in report["datasets"].items():
        c, t = d["classes"], d["teacher"]
        rate = f"{t['error_rate']:.1%} of {t['checked']}" if t and t["error_rate"] is not None else "-"
        verdict = f"dropped ({d['drop_reason']})" if d["dropped"] else "kept"
        lines.append(f"| {name} | {d['total']} | {d['kept']} | {c[KEEP]} | {c[FIX]} | {c[WRONG]} | {c[BAD]} | "
                     f"{d['duplicates']} | {rate} | {verdict} |")
    lines += ["", f"Kept in all: {report['kept']} samples in {len(report['shards'])} shard(s). "
              "Fixable formatting is kept after repair. Removed samples are listed in `removed.jsonl`; "
              "`removals.png` plots them by reason.", ""]
    for name, d in report["datasets"].items():
        source = f"Source: `{d['path']}`" + (f" — read error: {d['read_error']}" if d["read_error"] else "")
        lines += [f"## {name}", "", source, ""]
        if d["reasons_by_class"]:
            lines.append("| class | reason | count |")
            lines.append("|---|---|---|")
            for cls, reasons in d["reasons_by_class"].items():
                lines += [f"| {cls} | {r} | {n} |" for r, n in reasons.items()]
            lines.append("")
        for reason, exs in d["examples"].items():
            lines.append(f"**{reason}**")
            for e in exs:
                q = e["question"].replace("\n", " ").replace("|", "/")
                a = e["answer"].replace("\n", " ").replace("|", "/")
                lines.append(f"- `{e['id']}`: Q: {q} — A: {a}" + (f" — {e['detail']}" if e["detail"] else ""))
            lines.append("")
    return "\n".join(lines) + "\n"


def plot_removals(report: dict[str, Any], path: Path) -> None:
    """Horizontal bars: samples per reason over all datasets, coloured by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {FIX: "#4f81bd", WRONG: "#c0504d", BAD: "#8064a2", "duplicate": "#9bbb59", "dataset dropped": "#404040"}
    counts: Counter = Counter()
    for d in report["datasets"].values():
        for cls, reasons in d["reasons_by_class"].items():
            for r, n in reasons.items():
                counts[(cls, r)] += n
        if d["dropped"]:
            counts[("dataset dropped", f"dataset dropped: {Path(d['path']).name}")] += d["total"]
    items = sorted(counts.items(), key=lambda kv: kv[1])
    reasons = Counter(r for (_, r), _ in items)
    labels = [r if reasons[r] == 1 else f"{r} ({c})" for (c, r), _ in items]
    fig, ax = plt.subplots(figsize=(8, 0.35 * max(4, len(items)) + 1.2))
    if items:
        ax.barh(labels, [n for _, n in items], color=[colors[c] for (c, _), _ in items])
        for i, (_, n) in enumerate(items):
            ax.text(n, i, f" {n}", va="center", fontsize=8)
        from matplotlib.patches import Patch

        shown = dict.fromkeys(c for (c, _), _ in items)
        ax.legend(handles=[Patch(color=colors[c], label=c + (" (repaired, kept)" if c == FIX else "")) for c in shown],
                  loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "nothing removed or repaired", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("samples")
    ax.set_title("Curation: samples removed or repaired, by reason")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
