"""`phi4rv eval run | report | score | tasks`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from phi4rv.eval.extract import COORDS
from phi4rv.eval.official import RULES
from phi4rv.eval.records import iter_lines
from phi4rv.eval.tasks import PAPER_AVERAGE, TASKS, Task, get_task
from phi4rv.eval.tasks.base import EvalError
from phi4rv.processing.reasoning import MODES


def _data_overrides(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in TASKS:
            raise EvalError(f"--data takes TASK=PATH with TASK one of {', '.join(TASKS)}, got {item!r}")
        out[name] = Path(path)
    return out


def _tasks(args: argparse.Namespace, names: list[str]) -> list[Task]:
    judge = None
    if getattr(args, "judge_endpoint", None):
        from phi4rv.eval.judge import LLMJudge

        if not args.judge_model:
            raise EvalError("--judge-endpoint needs --judge-model")
        judge = LLMJudge(args.judge_endpoint, args.judge_model, api_key=args.api_key)
    options = {
        "screenspot_v2": {"coords": args.coords},
        "synthetic": {"per_generator": args.synthetic_per_generator, "difficulty": args.synthetic_difficulty},
        "mathvista": {"judge": judge, "judge_name": judge.name if judge else None},
    }
    return [get_task(n, rules=args.rules, **options.get(n, {})) for n in names]


def _extra_body(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalError(f"--extra-body is not JSON: {e.msg}") from None
    if not isinstance(extra, dict):
        raise EvalError("--extra-body must be a JSON object")
    return extra


def cmd_run(args: argparse.Namespace) -> None:
    from phi4rv.eval.report import load_rows, to_markdown
    from phi4rv.eval.runner import RunConfig, parse_list, run_eval

    # check everything cheap before a model is loaded
    names = parse_list(args.tasks, list(TASKS), "task")
    modes = parse_list(args.modes, list(MODES), "mode")
    for flag, value in (("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-size", args.batch_size), ("--concurrency", args.concurrency)):
        if value is not None and value < 1:
            raise EvalError(f"{flag} must be >= 1, got {value}")
    if args.model is not None and not Path(args.model).is_dir():
        raise EvalError(f"model folder not found: {args.model}")
    if args.endpoint is not None:
        if not args.served_model:
            raise EvalError("--endpoint needs --served-model (the model name the server knows)")
        if args.thinking_budget is not None:
            raise EvalError("--thinking-budget works with --model only")
    extra = _extra_body(args.extra_body)
    overrides = _data_overrides(args.data)
    tasks = _tasks(args, names)
    for t in tasks:
        if t.name not in overrides:
            t.find_data(args.data_dir)

    if args.model is not None:
        from phi4rv.eval.backends import LocalBackend

        backend = LocalBackend(args.model, batch_size=args.batch_size, thinking_budget=args.thinking_budget,
                               dtype=args.dtype, device=args.device, warmup=not args.no_warmup,
                               max_num_patches=args.max_num_patches, quantize=args.quantize,
                               compile=args.compile_mode or args.compile)
    else:
        from phi4rv.eval.backends import HTTPBackend

        backend = HTTPBackend(args.endpoint, args.served_model, concurrency=args.concurrency, retries=args.retries,
                              timeout=args.timeout, api_key=args.api_key, stream=not args.no_stream,
                              warmup=not args.no_warmup, extra_body=extra)
    cfg = RunConfig(out=args.out, tasks=tasks, modes=modes, data_dir=args.data_dir, data_paths=overrides,
                    limit=args.limit, seed=args.seed, max_new_tokens=args.max_new_tokens, label=args.label)
    try:
        run_eval(cfg, backend)
    finally:
        backend.close()
    print(to_markdown(load_rows([args.out]), [], []), end="")
    print(f"records in {args.out}; `phi4rv eval report {args.out} --out DIR` writes tables and plots")


def cmd_report(args: argparse.Namespace) -> None:
    from phi4rv.eval.report import write_report

    report = write_report(args.run_dirs, args.out)
    print((Path(args.out) / "report.md").read_text(), end="")
    print(f"wrote {args.out}/report.md, report.json and {len(report['figures'])} figure(s)")


def cmd_score(args: argparse.Namespace) -> None:
    from phi4rv.eval.runner import load_task, score_output

    task = _tasks(args, [args.task])[0]
    samples = {s.id: s for s in load_task(task, args.data_dir, _data_overrides(args.data).get(task.name))}
    if not Path(args.predictions).is_file():
        raise EvalError(f"predictions file not found: {args.predictions}")
    rows: dict[str, dict] = {}
    for n, pred in enumerate(iter_lines(Path(args.predictions)), 1):
        sid = str(pred.get("id", ""))
        if sid not in samples:
            raise EvalError(f"{args.predictions}:{n}: id {sid!r} is not a {task.name} sample")
        if pred.get("error"):  # the query failed: wrong, and counted as an error
            rows[sid] = {"id": sid, "groups": samples[sid].groups, "parse": "error", "prediction": None,
                         "score": 0.0, "error": str(pred["error"])}
            continue
        output = next((pred[k] for k in ("output", "response", "prediction", "text") if k in pred), None)
        if not isinstance(output, str):
            raise EvalError(f"{args.predictions}:{n}: no 'output' string (a failed query: give it an 'error')")
        thinking = pred.get("thinking") or pred.get("reasoning_content")
        rows[sid] = {"id": sid, "groups": samples[sid].groups,
                     **score_output(task, samples[sid], output, args.in_thinking, thinking)}
    if not rows:
        raise EvalError(f"{args.predictions}: no predictions")
    missing = [sid for sid in samples if sid not in rows]
    counted = list(rows.values())
    if not args.allow_missing:  # a sample without a prediction is wrong
        counted += [{"id": sid, "groups": samples[sid].groups, "parse": "missing", "prediction": None, "score": 0.0}
                    for sid in missing]
    if args.out:
        with open(args.out, "w") as f:
            for r in counted:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    result = {
        "task": task.name,
        "version": task.version,
        "rules": task.rules if task.has_rules else None,
        "n": len(counted),  # the denominator
        "predictions": len(rows),
        "missing": len(missing),
        "missing_counted_wrong": not args.allow_missing,
        "errors": sum(r["parse"] == "error" for r in counted),
        "unparsed": sum(r["parse"] in ("unparsed", "no_answer") for r in counted),
        **{k: round(v, 4) for k, v in task.metrics(counted).items()},
    }
    print(json.dumps(result, indent=2))


def cmd_tasks(args: argparse.Namespace) -> None:
    for name, cls in TASKS.items():
        star = " *" if name in PAPER_AVERAGE else ""
        print(f"{name:<14} v{cls.version}{star}  {cls.layout}")
    print("* in the paper's 4-benchmark average")
    print("scoring: --rules official (default: each benchmark's own scorer) | lenient (phi4rv's kinder extraction)")


def _common(s: argparse.ArgumentParser) -> None:
    s.add_argument("--data-dir", type=Path, help="folder holding one folder per task (see `phi4rv eval tasks`)")
    s.add_argument("--data", action="append", default=[], metavar="TASK=PATH", help="a task's data elsewhere")
    s.add_argument("--coords", default="fraction", choices=COORDS,
                   help="ScreenSpot: what the model's box numbers mean (default: fractions 0-1, the release's contract)")
    s.add_argument("--synthetic-per-generator", type=int, default=20, help="synthetic, generated: seeds per generator")
    s.add_argument("--synthetic-difficulty", default="tiny", help="synthetic, generated: difficulty preset")
    s.add_argument("--judge-endpoint", help="MathVista: OpenAI-compatible endpoint of an LLM answer extractor (off by default)")
    s.add_argument("--judge-model", help="MathVista: the judge's served model name")
    s.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    s.add_argument("--rules", default="official", choices=RULES,
                   help="scoring rules: each benchmark's official scorer (default) or phi4rv's lenient extraction "
                        "(recorded in run.json; reports say which)")


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="evaluate a checkpoint or endpoint: accuracy, time and tokens per mode")
    esub = e.add_subparsers(dest="eval_command", required=True)

    s = esub.add_parser("run", help="run tasks x modes, writing one record per sample (resumes)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", type=Path, help="phi4rv checkpoint folder (in-process)")
    g.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    s.add_argument("--served-model", help="with --endpoint: the model name to request")
    s.add_argument("--tasks", default=",".join(PAPER_AVERAGE), help=f"comma list of {', '.join(TASKS)}")
    s.add_argument("--modes", default="auto", help="comma list of auto, think, nothink")
    s.add_argument("--out", type=Path, required=True, help="run folder (records, run.json)")
    s.add_argument("--limit", type=int, default=None, help="a fixed random subset of N samples per task")
    s.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    s.add_argument("--max-new-tokens", type=int, default=None, help="default: each task's (4096, the paper's)")
    s.add_argument("--label", help="name in reports (default: the model's)")
    s.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up generation")
    s.add_argument("--batch-size", type=int, default=1, help="--model: queries per batch (1 = the paper's timing)")
    s.add_argument("--thinking-budget", type=int, default=None, help="--model: force </think> after N tokens")
    s.add_argument("--max-num-patches", type=int, default=None,
                   help="--model: patch budget per image (default: the checkpoint's maximum)")
    s.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    s.add_argument("--device", default=None)
    s.add_argument("--quantize", default=None, metavar="int8|int4|w8a8", help="--model: quantization at load time (see phi4rv quantize)")
    s.add_argument("--compile", action="store_true", help="--model: torch.compile the decode step (prefill stays eager)")
    s.add_argument("--compile-mode", default=None, metavar="MODE",
                   help="--model: torch.compile mode (implies --compile): default, reduce-overhead (CUDA graphs, "
                        "untested), max-autotune, max-autotune-no-cudagraphs")
    s.add_argument("--concurrency", type=int, default=1, help="--endpoint: requests in flight")
    s.add_argument("--retries", type=int, default=3, help="--endpoint: retries on timeouts, 429 and 5xx")
    s.add_argument("--timeout", type=float, default=600.0, help="--endpoint: seconds per request")
    s.add_argument("--no-stream", action="store_true", help="--endpoint: no streaming (no time to first token)")
    s.add_argument("--extra-body", help='--endpoint: JSON merged into each request, e.g. \'{"top_k": 1}\'')
    _common(s)
    s.set_defaults(func=cmd_run)

    s = esub.add_parser("report", help="tables, the 4-benchmark average and Pareto plots from run folders")
    s.add_argument("run_dirs", nargs="+", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.set_defaults(func=cmd_report)

    s = esub.add_parser("score", help="score predictions made elsewhere (JSONL: id, output) and print metrics")
    s.add_argument("--task", required=True, choices=list(TASKS))
    s.add_argument("--predictions", required=True, type=Path)
    s.add_argument("--in-thinking", action="store_true", help="outputs start inside <think> (forced think prompts)")
    s.add_argument("--out", type=Path, help="also write the scored lines here")
    s.add_argument("--allow-missing", action="store_true",
                   help="score only the samples with a prediction (default: a missing one is wrong)")
    _common(s)
    s.set_defaults(func=cmd_score)

    s = esub.add_parser("tasks", help="list tasks, versions and the data layout each expects")
    s.set_defaults(func=cmd_tasks)

