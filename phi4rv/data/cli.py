"""`phi4rv data synth | curate | teacher | mix | stats`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def cmd_synth(args: argparse.Namespace) -> None:
    from phi4rv.data.synth.writer import resolve_tasks, write_synthetic

    tasks = resolve_tasks(args.task or ["all"])
    if args.n < 1:
        raise ValueError("--n must be at least 1")
    m = write_synthetic(tasks, args.n, args.seed, args.difficulty, args.out, args.shard_size, args.workers,
                        preview=args.preview_n if args.preview else 0)
    print(f"wrote {m['samples']} samples in {len(m['shards'])} shard(s) to {args.out} "
          f"(think ratio {m['think_ratio']:.2f})" + (f"; preview {Path(args.out) / 'preview.png'}" if args.preview else ""))


def cmd_curate(args: argparse.Namespace) -> None:
    from phi4rv.data.curate import CurateConfig, curate
    from phi4rv.data.teacher import TeacherConfig

    teacher = None
    if args.teacher_endpoint:
        if not args.teacher_model:
            raise ValueError("--teacher-model is required with --teacher-endpoint")
        teacher = TeacherConfig(endpoint=args.teacher_endpoint, model=args.teacher_model,
                                api_key=os.environ.get(args.api_key_env), concurrency=args.concurrency,
                                timeout=args.timeout, attempts=1, temperature=0.0)
    cfg = CurateConfig(near_duplicate_bits=args.near_dup_bits, dedup=not args.no_dedup, repair=not args.no_repair,
                       teacher=teacher, max_error_rate=args.max_error_rate, verify_fraction=args.verify_fraction,
                       shard_size=args.shard_size, seed=args.seed, image_root=args.image_root)
    report = curate(args.inputs, cfg, args.out)
    for name, d in report["datasets"].items():
        verdict = "DROPPED" if d["dropped"] else "kept"
        print(f"{name}: {d['total']} in, {d['kept']} out ({verdict}); " +
              ", ".join(f"{k} {v}" for k, v in d["classes"].items()))
    print(f"report: {Path(args.out) / 'report.md'}")


def cmd_teacher(args: argparse.Namespace) -> None:
    from phi4rv.data.formats import read_samples
    from phi4rv.data.teacher import TeacherConfig, synthesize

    cfg = TeacherConfig(endpoint=args.endpoint, model=args.model, api_key=os.environ.get(args.api_key_env),
                        concurrency=args.concurrency, timeout=args.timeout, max_retries=args.retries,
                        attempts=args.attempts, temperature=args.temperature, max_tokens=args.max_tokens,
                        rel_tol=args.rel_tol, vote=args.vote)
    samples = read_samples(args.input, image_root=args.image_root)
    summary = synthesize(samples, cfg, args.out, limit=args.limit, tasks=args.tasks)
    print(json.dumps(summary, indent=2))


def _dataset_weight(text: str) -> tuple[str, float]:
    path, sep, weight = text.rpartition(":")
    if not sep or not path:
        return text, 1.0
    try:
        return path, float(weight)
    except ValueError:
        return text, 1.0  # a path that contains ':' and no weight


def cmd_mix(args: argparse.Namespace) -> None:
    from phi4rv.data.mix import MixConfig, format_summary, write_mixture

    ratio = None if args.think_ratio < 0 else args.think_ratio
    cfg = MixConfig(datasets=[_dataset_weight(d) for d in args.dataset], think_ratio=ratio, heldout=args.heldout,
                    validation=args.validation, total=args.total, seed=args.seed, shard_size=args.shard_size, tokenizer=args.tokenizer)
    for path, _ in cfg.datasets:
        if not Path(path).exists():
            raise FileNotFoundError(f"dataset not found: {path}")
    m = write_mixture(cfg, args.out)
    for split, s in m["splits"].items():
        print(format_summary(s, f"== {split} ({Path(args.out) / split})"))
    print(f"manifest: {Path(args.out) / 'manifest.json'}")


def cmd_stats(args: argparse.Namespace) -> None:
    from phi4rv.data.formats import read_samples
    from phi4rv.data.mix import Summary, format_summary

    tokenizer = None
    if args.tokenizer:
        from phi4rv.processing.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(args.tokenizer)
    from tqdm import tqdm

    acc = Summary(tokenizer)
    for s in tqdm(read_samples(args.path, image_root=args.image_root), desc="reading", unit="sample", leave=False):
        acc.add(s)
    result = acc.result()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_summary(result, str(args.path)))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `data` and its subcommands to the `phi4rv` parser."""
    from phi4rv.data.synth import DIFFICULTIES, GENERATORS

    data = sub.add_parser("data", help="synthetic data, curation, teacher traces, mixtures, statistics")
    dsub = data.add_subparsers(dest="data_command", required=True)

    s = dsub.add_parser("synth", help="generate synthetic samples into Parquet shards")
    s.add_argument("--task", action="append", help=f"task(s), comma-separated or repeated, or 'all': {', '.join(GENERATORS)}")
    s.add_argument("--n", type=int, default=100, help="samples per task")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--difficulty", default="default", choices=list(DIFFICULTIES))
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--shard-size", type=int, default=1000)
    s.add_argument("--workers", type=int, default=1, help="processes")
    s.add_argument("--preview", action="store_true", help="also write preview.png, a contact sheet with Q/A")
    s.add_argument("--preview-n", type=int, default=24, help="samples on the contact sheet")
    s.set_defaults(func=cmd_synth)

    s = dsub.add_parser("curate", help="check, deduplicate, triage, repair and (optionally) teacher-verify datasets")
    s.add_argument("inputs", nargs="+", type=Path, help=".json / .jsonl / .parquet files or folders of shards")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--image-root", type=Path, default=None)
    s.add_argument("--near-dup-bits", type=int, default=4, help="dHash distance counted as a near duplicate (-1: exact only)")
    s.add_argument("--no-dedup", action="store_true")
    s.add_argument("--no-repair", action="store_true", help="drop fixable formatting instead of repairing it")
    s.add_argument("--teacher-endpoint", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    s.add_argument("--teacher-model", default=None)
    s.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    s.add_argument("--max-error-rate", type=float, default=0.2,
                   help="drop a dataset whose teacher-checked error rate exceeds this")
    s.add_argument("--verify-fraction", type=float, default=1.0, help="share of each dataset the teacher checks")
    s.add_argument("--concurrency", type=int, default=8)
    s.add_argument("--timeout", type=float, default=120.0)
    s.add_argument("--shard-size", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_curate)

    s = dsub.add_parser("teacher", help="teacher traces with rejection sampling against an OpenAI-compatible endpoint")
    s.add_argument("input", type=Path)
    s.add_argument("--endpoint", required=True, help="base URL, e.g. http://127.0.0.1:8000/v1")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True, type=Path, help="results JSONL (appended; a rerun skips finished ids)")
    s.add_argument("--image-root", type=Path, default=None)
    s.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    s.add_argument("--concurrency", type=int, default=8)
    s.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    s.add_argument("--retries", type=int, default=4, help="retries per request on errors and timeouts")
    s.add_argument("--attempts", type=int, default=4, help="traces tried per sample until one verifies")
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--max-tokens", type=int, default=2048)
    s.add_argument("--rel-tol", type=float, default=0.0, help="relative tolerance for numeric answers")
    s.add_argument("--vote", type=int, default=0, metavar="K",
                   help="regenerate answers with no trusted ground truth: keep the answer a majority of K traces agree on")
    s.add_argument("--limit", type=int, default=None, help="at most this many samples")
    s.add_argument("--tasks", nargs="*", default=None, help="only samples of these tasks")
    s.set_defaults(func=cmd_teacher)

    s = dsub.add_parser("mix", help="weighted mixture with a think ratio and a leak-free held-out split")
    s.add_argument("--dataset", action="append", required=True, metavar="PATH[:WEIGHT]")
    s.add_argument("--think-ratio", type=float, default=0.2, help="share of think samples (-1: keep the datasets' own)")
    s.add_argument("--heldout", type=float, default=0.1)
    s.add_argument("--validation", type=float, default=0.0,
                   help="share for a val/ split (to tune on), apart from heldout/ by image")
    s.add_argument("--total", type=int, default=None,
                   help="mixture size (repeats small datasets); default: the largest without repeats")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", type=int, default=1000)
    s.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder for exact token counts")
    s.add_argument("--out", required=True, type=Path)
    s.set_defaults(func=cmd_mix)

    s = dsub.add_parser("stats", help="counts per task and mode, text tokens, image patch histogram")
    s.add_argument("path", type=Path)
    s.add_argument("--image-root", type=Path, default=None)
    s.add_argument("--tokenizer", type=Path, default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)
