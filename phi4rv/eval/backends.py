"""Where answers come from: a phi4rv checkpoint in-process, or an OpenAI-compatible endpoint.

Both take the same `Query` (the task's messages, with one `<image>\\n` per image, and its images)
and return a `Reply` with the raw output, token counts and times. The HTTP backend turns each
`<image>\\n` into an `image_url` part at the same place, which any server rendering the release's
template (an image part → "<image>\\n") turns back into the very same prompt.

Times, in seconds: `preprocess` (images + prompt), `prefill` (request start → first token; for
the local backend `vision` is split out of it), `decode` (first → last token); `ttft` and `total`
are their sums, so a record's times add up. Warm-up generations are never timed.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi4rv.data.formats import ImageRef, load_image_bytes
from phi4rv.processing.chat import IMAGE_TOKEN

REASONING_EFFORT = {"think": "high", "nothink": "none"}  # auto: omitted, the model picks


@dataclass
class Query:
    messages: list[dict[str, str]]
    images: list[ImageRef]
    mode: str  # auto | think | nothink
    max_new_tokens: int


@dataclass
class Reply:
    output: str = ""  # raw generated text (HTTP: the message content)
    thinking: str | None = None  # reasoning the server returned apart from the content
    in_thinking: bool = False  # the prompt opened <think> itself, so `output` starts inside it
    finish_reason: str | None = None
    tokens: dict[str, int | None] = field(default_factory=dict)  # prompt, image, thinking, answer, output
    times: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None
    attempts: int = 1


def _times(preprocess: float, prefill: float | None, decode: float | None, vision: float | None = None) -> dict:
    if prefill is None or decode is None:
        return {"preprocess": preprocess, "prefill": None, "decode": None, "ttft": None, "total": None}
    ttft = preprocess + (vision or 0.0) + prefill
    times = {"preprocess": preprocess, "prefill": prefill, "decode": decode, "ttft": ttft, "total": ttft + decode}
    if vision is not None:
        times["vision"] = vision
    return times


# ---- local ------------------------------------------------------------------------------------


class LocalBackend:
    """A checkpoint in this process, greedy, `batch_size` queries per generation batch (1 = the
    paper's protocol: each query timed alone). One untimed warm-up generation comes first."""

    def __init__(
        self,
        model_dir: str | Path,
        batch_size: int = 1,
        thinking_budget: int | None = None,
        dtype: str | None = None,
        device: str | None = None,
        warmup: bool = True,
        max_num_patches: int | None = None,
        quantize: str | None = None,
    ):
        from phi4rv.chat_model import ChatModel

        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.model_dir = Path(model_dir)
        self.cm = ChatModel.load(model_dir, dtype=dtype, device=device, max_num_patches=max_num_patches,
                                 quantize=quantize)
        self.quantize = quantize
        self.batch_size = batch_size
        self.thinking_budget = thinking_budget
        self.warmup = warmup
        self._warm = False

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "model": str(self.model_dir.resolve())}

    def settings(self) -> dict[str, Any]:
        return {"thinking_budget": self.thinking_budget, "temperature": 0,
                "max_num_patches": self.cm.image_cfg.max_num_patches}

    def runtime(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "device": str(self.cm.model.device),
                "dtype": str(next(self.cm.model.parameters()).dtype).removeprefix("torch."), "quantize": self.quantize}

    def _params(self, max_new_tokens: int):
        from phi4rv.generation.sampling import SamplingParams

        return self.cm.params(max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=0),
                              thinking_budget=self.thinking_budget)

    def generate(self, queries: list[Query]) -> Iterator[tuple[int, Reply]]:
        if queries and self.warmup and not self._warm:
            q = queries[0]
            self._run_batch([Query(q.messages, q.images, q.mode, min(q.max_new_tokens, 4))])
            self._warm = True
        for start in range(0, len(queries), self.batch_size):
            for j, reply in enumerate(self._run_batch(queries[start : start + self.batch_size])):
                yield start + j, reply

    def _run_batch(self, batch: list[Query]) -> list[Reply]:
        from phi4rv.generation.generate import generate_stream
        from phi4rv.processing.image import ImageError

        replies: list[Reply | None] = [None] * len(batch)
        prepared = []
        t0 = time.perf_counter()
        for i, q in enumerate(batch):
            try:
                request, info = self.cm.prepare(q.messages, q.images, q.mode)
                prepared.append((i, request, info))
            except (ImageError, ValueError) as e:
                replies[i] = Reply(error=f"{type(e).__name__}: {e}")
        preprocess = time.perf_counter() - t0
        if prepared:
            n = len(prepared)
            text, first, last = [""] * n, [0.0] * n, [0.0] * n
            count, thinking, finish = [0] * n, [0] * n, [None] * n
            timing: dict[str, float] = {}
            start = time.perf_counter()
            for events in generate_stream(self.cm.model, self.cm.tokenizer, [r for _, r, _ in prepared],
                                          self._params(batch[0].max_new_tokens), timing):
                now = time.perf_counter()
                for e in events:
                    k = e.row
                    if count[k] == 0:
                        first[k] = now
                    last[k] = now
                    count[k] += 1
                    thinking[k] += e.thinking
                    text[k] += e.text
                    finish[k] = e.finish_reason
            vision = timing.get("vision", 0.0)
            for k, (i, request, info) in enumerate(prepared):
                usage = info["usage"]
                replies[i] = Reply(
                    output=text[k],
                    in_thinking=request.mode == "think",
                    finish_reason=finish[k],
                    tokens={"prompt": usage["prompt_tokens"], "image": usage["image_tokens"], "thinking": thinking[k],
                            "answer": count[k] - thinking[k], "output": count[k]},
                    times=_times(preprocess, first[k] - start - vision, last[k] - first[k], vision),
                )
        return replies  # type: ignore[return-value]

    def close(self) -> None:
        pass


# ---- HTTP (OpenAI-compatible) -----------------------------------------------------------------


def _mime(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "application/octet-stream"


def to_openai_messages(messages: list[dict[str, str]], images: list[ImageRef]) -> list[dict]:
    """String contents with `<image>\\n` tags → OpenAI content parts with the images as data URIs,
    each at its tag's place (the newline after a tag belongs to the image part)."""
    it = iter(images)
    out = []
    for m in messages:
        pieces = m["content"].split(IMAGE_TOKEN)
        if len(pieces) == 1:
            out.append({"role": m["role"], "content": m["content"]})
            continue
        parts: list[dict] = []
        for j, piece in enumerate(pieces):
            if j:
                try:
                    data = load_image_bytes(next(it))
                except StopIteration:
                    raise ValueError("more <image> tags than images") from None
                url = f"data:{_mime(data)};base64,{base64.b64encode(data).decode()}"
                parts.append({"type": "image_url", "image_url": {"url": url}})
                piece = piece.removeprefix("\n")
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts})
    return out


class _Retryable(Exception):
    pass


class _Fatal(Exception):
    pass


class HTTPBackend:
    """An OpenAI-compatible `/chat/completions` endpoint (vLLM, Azure Foundry, phi4rv serve, …).

    Greedy (temperature 0), `max_tokens` per query, the mode as `reasoning_effort` ("high" for
    think, "none" for nothink, omitted for auto). Streams by default, so time to first token is
    measured. `concurrency` requests run at once; a timeout, a connection error, 408/409/429 or a
    5xx is retried up to `retries` times with exponential back-off. Only the successful attempt
    is timed. Reasoning comes from `reasoning_content` / `reasoning`, or inline `<think>…</think>`.
    """

    def __init__(
        self,
        endpoint: str,
        model: str,
        concurrency: int = 1,
        retries: int = 3,
        timeout: float = 600.0,
        backoff: float = 1.0,
        api_key: str | None = None,
        stream: bool = True,
        warmup: bool = True,
        extra_body: dict | None = None,
    ):
        import httpx

        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        endpoint = endpoint.rstrip("/")
        self.url = endpoint if endpoint.endswith("/chat/completions") else endpoint + "/chat/completions"
        self.endpoint = endpoint
        self.model = model
        self.concurrency = concurrency
        self.retries = retries
        self.backoff = backoff
        self.stream = stream
        self.warmup = warmup
        self.extra_body = extra_body or {}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=httpx.Timeout(timeout), headers=headers,
                                   limits=httpx.Limits(max_connections=concurrency))
        self._warm = False

    def describe(self) -> dict[str, Any]:
        return {"kind": "http", "endpoint": self.endpoint, "model": self.model}

    def settings(self) -> dict[str, Any]:
        return {"temperature": 0, **({"extra_body": self.extra_body} if self.extra_body else {})}

    def runtime(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "stream": self.stream}

    def body(self, q: Query) -> dict:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": to_openai_messages(q.messages, q.images),
            "max_tokens": q.max_new_tokens,
            "temperature": 0,
            "stream": self.stream,
        }
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if q.mode in REASONING_EFFORT:
            body["reasoning_effort"] = REASONING_EFFORT[q.mode]
        return {**body, **self.extra_body}

    def generate(self, queries: list[Query]) -> Iterator[tuple[int, Reply]]:
        if queries and self.warmup and not self._warm:
            q = queries[0]
            self.ask(Query(q.messages, q.images, q.mode, min(q.max_new_tokens, 4)))  # untimed; errors show later
            self._warm = True
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self.ask, q): i for i, q in enumerate(queries)}
            try:
                for fut in as_completed(futures):
                    yield futures[fut], fut.result()
            finally:
                for fut in futures:
                    fut.cancel()

    def ask(self, q: Query) -> Reply:
        t0 = time.perf_counter()
        try:
            body = self.body(q)
        except (OSError, ValueError) as e:
            return Reply(error=f"{type(e).__name__}: {e}")
        preprocess = time.perf_counter() - t0
        error = ""
        for attempt in range(1, self.retries + 2):
            try:
                reply = self._once(body, preprocess)
                reply.attempts = attempt
                return reply
            except _Retryable as e:
                error = str(e)
                if attempt <= self.retries:
                    time.sleep(self.backoff * 2 ** (attempt - 1))
            except _Fatal as e:
                return Reply(error=str(e), attempts=attempt)
        return Reply(error=f"{error} (gave up after {self.retries + 1} attempts)", attempts=self.retries + 1)

    def _once(self, body: dict, preprocess: float) -> Reply:
        import httpx

        start = time.perf_counter()
        try:
            if not self.stream:
                r = self.client.post(self.url, json=body)
                self._check(r.status_code, r.text)
                return self._from_message(r.json(), preprocess, time.perf_counter() - start)
            with self.client.stream("POST", self.url, json=body) as r:
                if r.status_code >= 400:
                    self._check(r.status_code, r.read().decode(errors="replace"))
                return self._from_stream(r.iter_lines(), preprocess, start)
        except httpx.TimeoutException as e:
            raise _Retryable(f"timeout: {type(e).__name__}") from None
        except httpx.TransportError as e:
            raise _Retryable(f"connection error: {type(e).__name__}: {e}") from None
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise _Fatal(f"malformed response: {type(e).__name__}: {e}") from None

    @staticmethod
    def _check(status: int, text: str) -> None:
        if status < 400:
            return
        msg = f"HTTP {status}: {text[:200].strip()}"
        if status in (408, 409, 429) or status >= 500:
            raise _Retryable(msg)
        raise _Fatal(msg)

    def _from_stream(self, lines: Iterator[str], preprocess: float, start: float) -> Reply:
        content, reasoning, usage, finish, first = "", "", None, None, None
        for line in lines:
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise _Retryable(f"stream error: {str(chunk['error'])[:200]}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                piece = delta.get("content") or ""
                think = delta.get("reasoning_content") or delta.get("reasoning") or ""
                if (piece or think) and first is None:
                    first = time.perf_counter()
                content += piece
                reasoning += think
                finish = choice.get("finish_reason") or finish
        end = time.perf_counter()
        first = first if first is not None else end
        return self._reply(content, reasoning or None, finish, usage, _times(preprocess, first - start, end - first))

    def _from_message(self, obj: dict, preprocess: float, elapsed: float) -> Reply:
        choice = obj["choices"][0]
        msg = choice["message"]
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        times = {"preprocess": preprocess, "prefill": None, "decode": None, "ttft": None, "total": preprocess + elapsed}
        return self._reply(msg.get("content") or "", reasoning, choice.get("finish_reason"), obj.get("usage"), times)

    @staticmethod
    def _reply(content: str, reasoning: str | None, finish: str | None, usage: dict | None, times: dict) -> Reply:
        usage = usage or {}
        details = usage.get("completion_tokens_details") or {}
        prompt_details = usage.get("prompt_tokens_details") or {}
        output = usage.get("completion_tokens")
        thinking = details.get("reasoning_tokens")
        answer = output - thinking if output is not None and thinking is not None else None
        image = usage.get("image_tokens", prompt_details.get("image_tokens"))
        tokens = {"prompt": usage.get("prompt_tokens"), "image": image, "thinking": thinking, "answer": answer, "output": output}
        return Reply(output=content, thinking=reasoning, finish_reason=finish, tokens=tokens, times=times)

    def close(self) -> None:
        self.client.close()
