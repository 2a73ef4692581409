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

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi4rv.client import ChatClient, ClientError, openai_messages
from phi4rv.data.formats import ImageRef, load_image_bytes

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
        compile: str | bool | None = None,
    ):
        from phi4rv.chat_model import ChatModel
        from phi4rv.generation.compiled import check_compile_mode

        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.model_dir = Path(model_dir)
        self.cm = ChatModel.load(model_dir, dtype=dtype, device=device, max_num_patches=max_num_patches,
                                 quantize=quantize, compile=compile)
        self.quantize = quantize
        self.compile = check_compile_mode(compile)
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
                "dtype": str(next(self.cm.model.parameters()).dtype).removeprefix("torch."), "quantize": self.quantize,
                "compile": self.compile}

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


class HTTPBackend:
    """An OpenAI-compatible `/chat/completions` endpoint (vLLM, Azure Foundry, phi4rv serve, …),
    through `phi4rv.client` (its retries, timeouts and image parts).

    Greedy (temperature 0), `max_tokens` per query, the mode as `reasoning_effort` ("high" for
    think, "none" for nothink, omitted for auto). Streams by default, so time to first token is
    measured. `concurrency` requests run at once. Only the answered attempt is timed. Reasoning
    comes from `reasoning_content` / `reasoning`, or inline `<think>…</think>`.
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
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.client = ChatClient(endpoint, api_key=api_key, timeout=timeout, retries=retries, backoff=backoff,
                                 max_connections=concurrency)
        self.endpoint = self.client.endpoint
        self.model = model
        self.concurrency = concurrency
        self.stream = stream
        self.warmup = warmup
        self.extra_body = extra_body or {}
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
            "messages": openai_messages(q.messages, (load_image_bytes(ref) for ref in q.images)),
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
        try:
            r = self.client.complete(body)
        except ClientError as e:
            return Reply(error=str(e), attempts=e.attempts)
        if self.stream:
            first = r.first if r.first is not None else r.ended
            times = _times(preprocess, first - r.started, r.ended - first)
        else:
            times = {"preprocess": preprocess, "prefill": None, "decode": None, "ttft": None,
                     "total": preprocess + r.ended - r.started}
        usage = r.usage
        details = usage.get("completion_tokens_details") or {}
        prompt_details = usage.get("prompt_tokens_details") or {}
        output = usage.get("completion_tokens")
        thinking = details.get("reasoning_tokens")
        answer = output - thinking if output is not None and thinking is not None else None
        image = usage.get("image_tokens", prompt_details.get("image_tokens"))
        tokens = {"prompt": usage.get("prompt_tokens"), "image": image, "thinking": thinking, "answer": answer,
                  "output": output}
        return Reply(output=r.content, thinking=r.reasoning, finish_reason=r.finish_reason, tokens=tokens, times=times,
                     attempts=r.attempts)

    def close(self) -> None:
        self.client.close()
