"""Teacher synthesis against any OpenAI-compatible chat-completions endpoint (vLLM, Azure, OpenAI,
`phi4rv serve`): `<think>` traces with rejection sampling, resumable.

For each sample the teacher sees the images (as data URIs) and the question and is asked to reason
inside `<think>…</think>` before answering. A trace is kept only if its final answer verifies
against the sample's ground truth (`meta["answer"]`, else the dataset's own answer) with
`phi4rv.data.verify`; a wrong answer is asked for again, up to `attempts` times. Requests run
`concurrency` at a time through `phi4rv.client` (a timeout per request; retries with exponential
backoff on timeouts, connection errors, 408/409/425/429 and 5xx).

With `vote` (regeneration: the dataset's answer is known to be wrong, or no answer is trusted),
`vote` traces are drawn and the answer a strict majority of them agree on (by `verify`) becomes the
new answer, with one of its traces.

Output: accepted samples append to `OUT.jsonl` (OpenAI messages with data-URI images, readable by
`formats.read_samples`), samples no attempt got right to `OUT.rejected.jsonl`, and the run's
accounting to `OUT.summary.json`. A rerun skips ids found in either file; samples that failed on
transport errors are not recorded and are tried again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from phi4rv.client import ChatClient, ClientError, content_parts
from phi4rv.data import verify
from phi4rv.data.formats import Sample, load_image_bytes
from phi4rv.processing.reasoning import THINK_END, THINK_START, parse_completion

SYSTEM_PROMPT = (
    "You are a careful expert. Look at the image(s) and answer the question. First reason step by step "
    "inside <think> and </think>, then give only the final answer after </think>, in the form the "
    "question asks for."
)
VERIFY_PROMPT = "Answer the question. Give only the final answer, in the form the question asks for."


@dataclass
class TeacherConfig:
    endpoint: str  # base URL such as http://127.0.0.1:8000/v1 (or the full .../chat/completions URL)
    model: str
    api_key: str | None = None
    concurrency: int = 8
    timeout: float = 120.0  # seconds per request
    max_retries: int = 4  # per request, on timeouts, connection errors, 408/429/5xx
    backoff: float = 1.0  # first retry waits about this long; doubles each time (with jitter)
    backoff_max: float = 30.0
    attempts: int = 4  # traces tried per sample until one verifies (rejection sampling)
    temperature: float = 0.7
    max_tokens: int = 2048
    rel_tol: float = 0.0  # numbers: relative tolerance (a sample's own meta tolerance still applies)
    iou: float = 0.5  # boxes: least IoU
    system_prompt: str = SYSTEM_PROMPT
    extra_body: dict[str, Any] = field(default_factory=dict)  # e.g. {"reasoning_effort": "high"}
    vote: int = 0  # > 0: regenerate answers with no trusted ground truth by majority of `vote` traces


@dataclass
class Reply:
    text: str  # the message content
    reasoning: str | None  # `reasoning_content` when the server returns thinking separately
    usage: dict[str, int]


def make_client(cfg: TeacherConfig) -> ChatClient:
    return ChatClient(cfg.endpoint, api_key=cfg.api_key, timeout=cfg.timeout, retries=cfg.max_retries,
                      backoff=cfg.backoff, backoff_max=cfg.backoff_max, max_connections=cfg.concurrency)


def user_content(sample: Sample, suffix: str = "") -> list[dict[str, Any]]:
    """The sample's first user turn as OpenAI content parts, images where its `<image>` tags are."""
    text = next(m["content"] for m in sample.messages if m["role"] == "user")
    parts = content_parts(text, (load_image_bytes(ref) for ref in sample.images))
    return parts + ([{"type": "text", "text": suffix}] if suffix else [])


def ask_teacher(client: ChatClient, cfg: TeacherConfig, messages: list[dict[str, Any]], temperature: float,
                seed: int | None = None, max_tokens: int | None = None) -> Reply:
    """One chat completion from the teacher (raises ClientError when it fails for good)."""
    body = {"model": cfg.model, "messages": messages, "temperature": temperature,
            "max_tokens": max_tokens or cfg.max_tokens, **cfg.extra_body}
    if seed is not None:
        body["seed"] = seed
    r = client.complete(body)
    return Reply(r.content, r.reasoning, {k: int(v) for k, v in r.usage.items() if isinstance(v, int)})


# ---- ground truth and traces -----------------------------------------------------------------


def ground_truth(sample: Sample) -> tuple[str, str]:
    """(answer, answer_type): the scene's answer when the sample has one, else the dataset's."""
    if "answer" in sample.meta:
        return str(sample.meta["answer"]), sample.meta.get("answer_type", "text")
    answers = sample.answers()
    if not answers:
        raise ValueError(f"sample {sample.id} has no answer to verify against")
    return verify.final_answer(answers[-1]), sample.meta.get("answer_type", "text")


def split_reply(reply: Reply) -> tuple[str | None, str]:
    """(thinking, final answer) from a teacher reply: its `reasoning_content`, else the reasoning
    written inline (by `parse_completion`'s rule; one that never closed is no trace)."""
    answer = verify.final_answer(reply.text)
    if reply.reasoning:
        return reply.reasoning.strip(), answer
    c = parse_completion(reply.text, "auto")
    return (c.thinking or None) if c.mode == "think" and c.finished else None, answer


@dataclass
class Outcome:
    sample: Sample
    status: str  # "ok" | "rejected" | "failed"
    thinking: str | None = None
    answer: str | None = None
    tries: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    final: str | None = None  # the answer written after </think>: the ground truth, or the majority's


def _stable_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def trace_one(client: ChatClient, cfg: TeacherConfig, sample: Sample) -> Outcome:
    try:
        messages = [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": user_content(sample)}]
        gold, kind = (None, sample.meta.get("answer_type", "text")) if cfg.vote > 0 else ground_truth(sample)
    except (ValueError, OSError, StopIteration) as e:  # no answer, an unreadable image, no user turn
        return Outcome(sample, "failed", error=f"{type(e).__name__}: {e}")
    tol = verify.tolerance_for(sample.meta, verify.Tolerance(rel=cfg.rel_tol, iou=cfg.iou))
    if cfg.vote > 0:
        return _vote_one(client, cfg, sample, messages, kind, tol)
    out = Outcome(sample, "rejected")
    for k in range(cfg.attempts):
        try:
            reply = ask_teacher(client, cfg, messages, cfg.temperature, seed=_stable_seed(f"{sample.id}/{k}"))
        except ClientError as e:
            return Outcome(sample, "failed", tries=out.tries, error=str(e))
        thinking, answer = split_reply(reply)
        ok = verify.verify(answer, gold, kind, tol, sample.meta.get("choices"))
        verdict = "ok" if ok and thinking else "no_trace" if ok else "wrong"
        out.tries.append({"answer": answer[:500], "verdict": verdict, "usage": reply.usage})
        if verdict == "ok":
            return Outcome(sample, "ok", thinking, answer, out.tries, final=gold)
    return out


def _vote_one(client: ChatClient, cfg: TeacherConfig, sample: Sample, messages: list[dict[str, Any]], kind: str,
              tol: verify.Tolerance) -> Outcome:
    """Regenerate an answer nobody vouches for: `vote` traces, grouped by answers that verify
    against each other; the largest group wins if it holds a strict majority."""
    groups: list[list[tuple[str, str]]] = []  # [(thinking, answer), ...] per distinct answer
    tries: list[dict[str, Any]] = []
    for k in range(cfg.vote):
        try:
            reply = ask_teacher(client, cfg, messages, cfg.temperature, seed=_stable_seed(f"{sample.id}/vote/{k}"))
        except ClientError as e:
            return Outcome(sample, "failed", tries=tries, error=str(e))
        thinking, answer = split_reply(reply)
        tries.append({"answer": answer[:500], "verdict": "vote" if thinking and answer else "no_trace", "usage": reply.usage})
        if not (thinking and answer):
            continue
        for g in groups:
            if verify.verify(answer, g[0][1], kind, tol, sample.meta.get("choices")):
                g.append((thinking, answer))
                break
        else:
            groups.append([(thinking, answer)])
    best = max(groups, key=len, default=[])
    if len(best) >= cfg.vote // 2 + 1:
        thinking, answer = best[0]
        final = verify.repair_format(answer, kind, choices=sample.meta.get("choices")) or answer  # canonical form
        final = final.rstrip(".") if kind == "text" else final
        return Outcome(sample, "ok", thinking, answer, tries, final=final)
    return Outcome(sample, "rejected", tries=tries)


def accepted_record(o: Outcome, model: str, regenerated: bool = False) -> dict[str, Any]:
    meta = {k: v for k, v in o.sample.meta.items() if k not in ("id", "messages")}
    if regenerated:
        meta = {**meta, "answer": o.final, "regenerated": True}
    return {
        "id": o.sample.id,
        "messages": [
            {"role": "user", "content": user_content(o.sample)},
            {"role": "assistant", "content": f"{THINK_START}\n{o.thinking}\n{THINK_END}\n\n{o.final}"},
        ],
        **meta,
        "mode": "think",
        "teacher": {"model": model, "attempts": len(o.tries), "answer": o.answer},
    }


# ---- the resumable job -----------------------------------------------------------------------


def _paths(out: Path) -> tuple[Path, Path, Path]:
    base = out.with_suffix("") if out.suffix == ".jsonl" else out
    return out, base.with_name(base.name + ".rejected.jsonl"), base.with_name(base.name + ".summary.json")


def done_ids(*files: Path) -> set[str]:
    """Ids already recorded; a torn last line (a crash mid-write) is ignored."""
    ids: set[str] = set()
    for f in files:
        if not f.exists():
            continue
        for line in f.read_text().splitlines():
            try:
                ids.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return ids


def _append(f, record: dict[str, Any]) -> None:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()


def _repair_tail(path: Path) -> None:
    """Cut a torn last line so new records start on a line of their own."""
    if path.exists() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])


def synthesize(samples: Iterable[Sample], cfg: TeacherConfig, out: str | Path, limit: int | None = None,
               tasks: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run teacher synthesis over `samples`, appending to `out`; returns (and writes) the summary."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ok_path, rej_path, sum_path = _paths(out)
    for p in (ok_path, rej_path):
        _repair_tail(p)
    done = done_ids(ok_path, rej_path)
    client = make_client(cfg)
    counts: Counter = Counter()
    per_task: dict[str, Counter] = {}
    tries_hist: Counter = Counter()
    failed: list[dict[str, str]] = []
    t0 = time.perf_counter()

    def todo() -> Iterator[Sample]:
        n = 0
        for s in samples:
            if tasks and s.meta.get("task") not in tasks:
                continue
            if limit is not None and n >= limit:
                return
            n += 1
            if s.id in done:
                counts["skipped_done"] += 1
                continue
            yield s

    bar = tqdm(desc="teacher", unit="sample", disable=not progress)
    with open(ok_path, "a") as ok_f, open(rej_path, "a") as rej_f, ThreadPoolExecutor(cfg.concurrency) as pool:
        pending: set[Future] = set()
        source = todo()
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < 2 * cfg.concurrency:
                s = next(source, None)
                if s is None:
                    exhausted = True
                else:
                    pending.add(pool.submit(trace_one, client, cfg, s))
            if not pending:
                break
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                o = fut.result()
                task = str(o.sample.meta.get("task", "unknown"))
                per_task.setdefault(task, Counter())[o.status] += 1
                counts[o.status] += 1
                if o.status == "ok":
                    tries_hist[len(o.tries)] += 1
                    _append(ok_f, accepted_record(o, cfg.model, regenerated=cfg.vote > 0))
                elif o.status == "rejected":
                    _append(rej_f, {"id": o.sample.id, "task": task, "tries": o.tries})
                else:
                    failed.append({"id": o.sample.id, "error": o.error or ""})
                bar.update()
                bar.set_postfix(ok=counts["ok"], rejected=counts["rejected"], failed=counts["failed"])
    bar.close()
    client.close()
    st = client.stats
    attempted = counts["ok"] + counts["rejected"]
    summary = {
        "endpoint": client.url,
        "model": cfg.model,
        "accepted": counts["ok"],
        "rejected": counts["rejected"],
        "failed": counts["failed"],
        "skipped_done": counts["skipped_done"],
        "acceptance_rate": round(counts["ok"] / attempted, 4) if attempted else None,
        "attempts_to_accept": {str(k): v for k, v in sorted(tries_hist.items())},
        "requests": st["requests"],
        "retries": st["retries"],
        "errors": dict(client.errors),
        "tokens": {"prompt": st["prompt_tokens"], "completion": st["completion_tokens"],
                   "total": st["prompt_tokens"] + st["completion_tokens"]},
        "per_task": {t: dict(c) for t, c in sorted(per_task.items())},
        "failed_ids": failed[:100],
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "files": {"accepted": str(ok_path), "rejected": str(rej_path)},
        "total_recorded": len(done_ids(ok_path, rej_path)),
    }
    sum_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---- answer checks for curation --------------------------------------------------------------


def teacher_answers(samples: list[Sample], cfg: TeacherConfig, progress: bool = True) -> dict[str, str | None]:
    """The teacher's final answer to each sample's question (None where the request failed)."""
    client = make_client(cfg)

    def ask(s: Sample) -> tuple[str, str | None]:
        messages = [{"role": "system", "content": VERIFY_PROMPT}, {"role": "user", "content": user_content(s)}]
        try:
            reply = ask_teacher(client, cfg, messages, cfg.temperature, seed=_stable_seed(s.id))
        except ClientError:
            return s.id, None
        return s.id, split_reply(reply)[1]

    with ThreadPoolExecutor(cfg.concurrency) as pool:
        answers = dict(tqdm(pool.map(ask, samples), total=len(samples), desc="teacher check", disable=not progress,
                            leave=False))
    client.close()
    return answers
