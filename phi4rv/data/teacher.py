"""Teacher synthesis against any OpenAI-compatible chat-completions endpoint (vLLM, Azure, OpenAI,
`phi4rv serve`): `<think>` traces with rejection sampling, resumable.

For each sample the teacher sees the images (as data URIs) and the question and is asked to reason
inside `<think>…</think>` before answering. A trace is kept only if its final answer verifies
against the sample's ground truth (`meta["answer"]`, else the dataset's own answer) with
`phi4rv.data.verify`; a wrong answer is asked for again, up to `attempts` times. Requests run
`concurrency` at a time, each with a timeout and retries with exponential backoff on timeouts,
connection errors, 408/429 and 5xx.

With `vote` (regeneration: the dataset's answer is known to be wrong, or no answer is trusted),
`vote` traces are drawn and the answer a strict majority of them agree on (by `verify`) becomes the
new answer, with one of its traces.

Output: accepted samples append to `OUT.jsonl` (OpenAI messages with data-URI images, readable by
`formats.read_samples`), samples no attempt got right to `OUT.rejected.jsonl`, and the run's
accounting to `OUT.summary.json`. A rerun skips ids found in either file; samples that failed on
transport errors are not recorded and are tried again.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from phi4rv.data import verify
from phi4rv.data.formats import Sample, load_image_bytes
from phi4rv.processing.chat import IMAGE_TOKEN, THINK_END, THINK_START, parse_completion

SYSTEM_PROMPT = (
    "You are a careful expert. Look at the image(s) and answer the question. First reason step by step "
    "inside <think> and </think>, then give only the final answer after </think>, in the form the "
    "question asks for."
)
VERIFY_PROMPT = "Answer the question. Give only the final answer, in the form the question asks for."
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


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


class TeacherError(RuntimeError):
    """A request that failed for good (after its retries, or with a non-retryable status)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Reply:
    text: str  # the message content
    reasoning: str | None  # `reasoning_content` when the server returns thinking separately
    usage: dict[str, int]


# ---- the HTTP client -------------------------------------------------------------------------


def _sniff_mime(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def data_uri(ref: bytes | str) -> str:
    data = load_image_bytes(ref)
    return f"data:{_sniff_mime(data)};base64,{base64.b64encode(data).decode()}"


def user_content(sample: Sample, suffix: str = "") -> list[dict[str, Any]]:
    """The sample's first user turn as OpenAI content parts, images where its `<image>` tags are."""
    text = next(m["content"] for m in sample.messages if m["role"] == "user")
    pieces = text.split(IMAGE_TOKEN)
    parts: list[dict[str, Any]] = []
    images = iter(sample.images)
    for k, piece in enumerate(pieces):
        if k:
            parts.append({"type": "image_url", "image_url": {"url": data_uri(next(images))}})
            piece = piece.removeprefix("\n")
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    if suffix:
        parts.append({"type": "text", "text": suffix})
    return parts


class ChatClient:
    """POSTs to /chat/completions with retries; counts requests, retries, errors and tokens."""

    def __init__(self, cfg: TeacherConfig):
        url = cfg.endpoint.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http(s) URL, got {cfg.endpoint!r}")
        self.cfg = cfg
        self.lock = threading.Lock()
        self.stats: Counter = Counter()
        self.errors: Counter = Counter()

    def _count(self, key: str, n: int = 1, errors: bool = False) -> None:
        with self.lock:
            (self.errors if errors else self.stats)[key] += n

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.cfg.api_key:
            headers["Authorization"] = f"Bearer {self.cfg.api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
            return json.loads(resp.read())

    def complete(self, messages: list[dict[str, Any]], temperature: float, seed: int | None = None,
                 max_tokens: int | None = None) -> Reply:
        body = {"model": self.cfg.model, "messages": messages, "temperature": temperature,
                "max_tokens": max_tokens or self.cfg.max_tokens, **self.cfg.extra_body}
        if seed is not None:
            body["seed"] = seed
        last, wait_at_least = "", 0.0
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self._count("retries")
                delay = self.cfg.backoff * 2 ** (attempt - 1) * (0.5 + random.random() / 2)
                time.sleep(min(self.cfg.backoff_max, max(delay, wait_at_least)))
                wait_at_least = 0.0
            self._count("requests")
            try:
                out = self._post(body)
            except urllib.error.HTTPError as e:
                kind, last = f"http_{e.code}", f"HTTP {e.code}: {e.read()[:200]!r}"
                self._count(kind, errors=True)
                if e.code not in RETRY_STATUS:
                    raise TeacherError(last, kind) from None
                try:  # a 429/503 may say how long to wait
                    wait_at_least = float(e.headers.get("Retry-After") or 0)
                except ValueError:
                    wait_at_least = 0.0
                continue
            except (TimeoutError, socket.timeout):
                kind, last = "timeout", f"no answer within {self.cfg.timeout:g} s"
                self._count(kind, errors=True)
                continue
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                kind = "timeout" if isinstance(reason, (TimeoutError, socket.timeout)) else "connection"
                last = f"{kind}: {reason}"
                self._count(kind, errors=True)
                continue
            except json.JSONDecodeError:
                kind, last = "bad_json", "the server's reply is not JSON"
                self._count(kind, errors=True)
                continue
            try:
                msg = out["choices"][0]["message"]
                usage = out.get("usage") or {}
            except (KeyError, IndexError, TypeError):
                kind, last = "bad_response", f"unexpected reply: {str(out)[:200]}"
                self._count(kind, errors=True)
                continue
            self._count("prompt_tokens", int(usage.get("prompt_tokens") or 0))
            self._count("completion_tokens", int(usage.get("completion_tokens") or 0))
            reasoning = msg.get("reasoning_content") or msg.get("reasoning")
            return Reply(msg.get("content") or "", reasoning, {k: int(v) for k, v in usage.items() if isinstance(v, int)})
        raise TeacherError(f"gave up after {self.cfg.max_retries + 1} tries: {last}", "gave_up")


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
            reply = client.complete(messages, cfg.temperature, seed=_stable_seed(f"{sample.id}/{k}"))
        except TeacherError as e:
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
            reply = client.complete(messages, cfg.temperature, seed=_stable_seed(f"{sample.id}/vote/{k}"))
        except TeacherError as e:
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
    client = ChatClient(cfg)
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
    client = ChatClient(cfg)

    def ask(s: Sample) -> tuple[str, str | None]:
        messages = [{"role": "system", "content": VERIFY_PROMPT}, {"role": "user", "content": user_content(s)}]
        try:
            reply = client.complete(messages, cfg.temperature, seed=_stable_seed(s.id))
        except TeacherError:
            return s.id, None
        return s.id, split_reply(reply)[1]

    with ThreadPoolExecutor(cfg.concurrency) as pool:
        return dict(tqdm(pool.map(ask, samples), total=len(samples), desc="teacher check", disable=not progress, leave=False))
