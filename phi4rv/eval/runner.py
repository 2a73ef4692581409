"""`phi4rv eval run`: tasks × modes through a backend into records, resuming what is done."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from phi4rv.eval.backends import Query, Reply
from phi4rv.eval.records import RecordWriter, done_ids, merge_run, read_records, records_path
from phi4rv.eval.tasks import EvalSample, Task
from phi4rv.eval.tasks.base import EvalError
from phi4rv.processing.reasoning import MODES, parse_completion


@dataclass
class RunConfig:
    out: Path
    tasks: list[Task]
    modes: list[str]
    data_dir: Path | None = None
    data_paths: dict[str, Path] = field(default_factory=dict)  # per-task overrides of <data_dir>/<task>
    limit: int | None = None
    seed: int = 0
    max_new_tokens: int | None = None  # default: each task's own (the paper's 4096)
    label: str | None = None
    max_consecutive_errors: int = 10  # a dead endpoint stops the run instead of filling it with errors


def select(samples: list[EvalSample], limit: int | None, seed: int) -> list[EvalSample]:
    """A fixed subset: `limit` samples drawn with `seed`, kept in dataset order."""
    if limit is None or limit >= len(samples):
        return samples
    keep = sorted(random.Random(seed).sample(range(len(samples)), limit))
    return [samples[i] for i in keep]


def load_task(task: Task, data_dir: Path | None, override: Path | None = None) -> list[EvalSample]:
    if override is not None:
        path = Path(override)
        if not path.exists():
            raise EvalError(f"data for task {task.name!r} not found: {path}")
    else:
        path = task.find_data(Path(data_dir) if data_dir is not None else None)
    samples = task.load(path)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise EvalError(f"task {task.name}: sample ids are not unique in {path}")
    return samples


def score_output(task: Task, sample: EvalSample, output: str, in_thinking: bool = False,
                 thinking: str | None = None) -> dict[str, Any]:
    """Split the reasoning off a raw output and score the answer part."""
    split = parse_completion(output, "think" if in_thinking else "auto")
    answer = split.answer if split.finished else None  # None: the reasoning never closed
    if thinking:  # the server returned the reasoning apart from the content
        split.thinking = thinking.strip() + (("\n" + split.thinking) if split.thinking else "")
        split.mode = "think"
    if answer is None or (not answer and split.thinking):  # the reasoning never led to an answer
        parse, scored, answer = "no_answer", None, None
    else:
        scored = task.score(sample, answer)
        parse = "ok" if scored.parsed else "unparsed"
    return {
        "thinking": split.thinking,
        "answer": answer,
        "answered_mode": split.mode,
        "parse": parse,
        "prediction": scored.prediction if scored else None,
        "score": scored.score if scored else 0.0,
        "judged": bool(scored and scored.judged),
    }


def make_record(task: Task, sample: EvalSample, mode: str, reply: Reply) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": sample.id,
        "task": task.name,
        "version": task.version,
        "mode": mode,
        "prompt": sample.messages,
        "n_images": len(sample.images),
        "target": sample.target,
        "groups": sample.groups,
        "output": reply.output,
        "finish_reason": reply.finish_reason,
    }
    if reply.error is not None:
        record.update(thinking=None, answer=None, answered_mode=None, parse="error", prediction=None, score=0.0,
                      judged=False)
    else:
        record.update(score_output(task, sample, reply.output, reply.in_thinking, reply.thinking))
    record.update(tokens=reply.tokens, times=reply.times, error=reply.error, attempts=reply.attempts)
    return record


def run_eval(cfg: RunConfig, backend: Any) -> dict[str, Any]:
    """Run every task × mode not yet recorded in `cfg.out`; returns run.json's content."""
    for m in cfg.modes:
        if m not in MODES:
            raise EvalError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    loaded = [(t, select(load_task(t, cfg.data_dir, cfg.data_paths.get(t.name)), cfg.limit, cfg.seed)) for t in cfg.tasks]
    run = merge_run(cfg.out, {
        "label": cfg.label or backend_label(backend),
        "backend": backend.describe(),
        "settings": {"limit": cfg.limit, "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens, **backend.settings()},
        "runtime": backend.runtime(),
        "tasks": {t.name: {"version": t.version, **t.options()} for t in cfg.tasks},
        "samples": {t.name: len(samples) for t, samples in loaded},  # every one counts in the report
        "modes": list(cfg.modes),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    for task, samples in loaded:
        max_new = cfg.max_new_tokens or task.max_new_tokens
        for mode in cfg.modes:
            path = records_path(cfg.out, task.name, mode)
            done = done_ids(read_records(path))
            todo = [s for s in samples if s.id not in done]
            if not todo:
                continue
            queries = [Query(s.messages, s.images, mode, max_new) for s in todo]
            errors, stop_after = 0, min(cfg.max_consecutive_errors, len(todo))
            with RecordWriter(path) as writer, tqdm(total=len(samples), initial=len(samples) - len(todo),
                                                    desc=f"{task.name}/{mode}", unit="q") as bar:
                for i, reply in backend.generate(queries):
                    writer.write(make_record(task, todo[i], mode, reply))
                    bar.update(1)
                    errors = errors + 1 if reply.error else 0
                    if errors >= stop_after:
                        raise EvalError(f"{task.name}/{mode}: {errors} errors in a row, stopping (last: {reply.error}); "
                                        "rerun the same command to resume")
    return run


def backend_label(backend: Any) -> str:
    d = backend.describe()
    return Path(d["model"]).name if d["kind"] == "local" else d["model"]


def parse_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise EvalError(f"unknown {what} {bad[0] if bad else text!r}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))
