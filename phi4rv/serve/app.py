"""`phi4rv serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

Routes: POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics (Prometheus).
Every bad request gets a 4xx with an OpenAI-style error body; a failure while generating fails
that request only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from phi4rv.chat_model import ChatModel
from phi4rv.generation.generate import GenerationParams, TokenEvent
from phi4rv.generation.grammar import JSON_OBJECT_SCHEMA, Grammar, GrammarError
from phi4rv.generation.sampling import SamplingParams
from phi4rv.processing.chat import ground
from phi4rv.processing.image import ImageError, PatchCache, image_size
from phi4rv.processing.reasoning import CompletionSplitter, parse_completion
from phi4rv.serve import protocol as P
from phi4rv.serve import tools
from phi4rv.serve.engine import Engine, EngineRequest, QueueFull, ShuttingDown


@dataclass
class ServeSettings:
    served_model_name: str
    api_key: str | None = None
    max_batch: int = 8
    max_context: int | None = None  # positions per sequence, prompt and answer (default: the model's max_length)
    max_queue: int = 64
    allow_local_images: Path | None = None
    allow_remote_images: bool = False
    max_images: int = 8
    request_timeout: float = 600.0
    default_max_tokens: int = 4096
    max_body_bytes: int = 64 * 2**20
    max_remote_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 36_000_000  # per image, read from its header before decoding
    max_request_pixels: int = 100_000_000  # all images of one request
    image_timeout: float = 30.0  # seconds for all of a request's image work (fetch, decode, resize)
    allow_special_tokens: bool = False  # text in messages may spell control tokens (off: encoded as text)
    prefix_cache_bytes: int = 256 * 2**20
    image_cache_bytes: int = 256 * 2**20


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.body, self.headers = status, P.error_body(message, type_, param, code), headers


class Metrics:
    def __init__(self, engine: Engine, image_cache: PatchCache | None = None):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("phi4rv_requests", "Chat completion requests by outcome", ["status"], registry=r)
        self.errors = Counter("phi4rv_request_errors", "Failed requests by error type", ["type"], registry=r)
        self.tokens = Counter("phi4rv_generated_tokens", "Generated tokens", registry=r)
        self.prompt_tokens = Counter("phi4rv_prompt_tokens", "Prompt tokens (image positions included)", registry=r)
        self.ttft = Histogram("phi4rv_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.latency = Histogram("phi4rv_request_latency_seconds", "Request latency", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.batch = Histogram("phi4rv_batch_size", "Sequences per decode step", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        Gauge("phi4rv_queue_depth", "Requests waiting for a slot", registry=r).set_function(lambda: engine.queue_depth)
        Gauge("phi4rv_running_requests", "Requests in the running batch", registry=r).set_function(lambda: engine.running)
        self.recent: deque[list[int]] = deque(maxlen=11)  # [second, tokens] of the last seconds
        Gauge("phi4rv_tokens_per_second", "Generated tokens/s over the last 10 s", registry=r).set_function(self.rate)
        prefixes = engine.core.prefixes
        Gauge("phi4rv_prefix_cache_hit_rate", "Prompt positions served from the prefix cache", registry=r).set_function(
            lambda: prefixes.hits / prefixes.lookups if prefixes is not None and prefixes.lookups else 0.0)
        Gauge("phi4rv_prefix_cache_bytes", "Bytes held by the prefix cache", registry=r).set_function(
            lambda: prefixes.nbytes if prefixes is not None else 0)
        Gauge("phi4rv_image_cache_hit_rate", "Images whose patches came from the image cache", registry=r).set_function(
            lambda: image_cache.hits / image_cache.lookups if image_cache is not None and image_cache.lookups else 0.0)
        Gauge("phi4rv_image_cache_bytes", "Bytes of patches held by the image cache", registry=r).set_function(
            lambda: image_cache.nbytes if image_cache is not None else 0)

    def token(self) -> None:
        self.tokens.inc()
        second = int(time.monotonic())
        if self.recent and self.recent[-1][0] == second:
            self.recent[-1][1] += 1
        else:
            self.recent.append([second, 1])

    def rate(self, window: int = 10) -> float:
        now = int(time.monotonic())
        return sum(n for second, n in self.recent if now - window <= second < now) / window


def _image_bytes(url: str, s: ServeSettings) -> bytes:
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise APIError(400, "image data URIs must be base64 encoded (data:image/...;base64,...)", param="messages")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "invalid base64 in image data URI", param="messages") from None
    if url.startswith(("http://", "https://")):
        if not s.allow_remote_images:
            raise APIError(400, "remote image URLs are disabled (start the server with --allow-remote-images)", param="messages")
        import httpx

        deadline = time.monotonic() + s.image_timeout
        try:
            with httpx.Client(timeout=10, follow_redirects=True, max_redirects=3) as client, \
                    client.stream("GET", url) as r:
                r.raise_for_status()
                data = b""
                for piece in r.iter_bytes():
                    data += piece
                    if len(data) > s.max_remote_image_bytes:
                        raise APIError(400, f"remote image larger than {s.max_remote_image_bytes} bytes", param="messages")
                    if time.monotonic() > deadline:
                        raise APIError(400, f"fetching the image took over {s.image_timeout:g}s", param="messages")
                return data
        except httpx.HTTPError as e:
            raise APIError(400, f"could not fetch image: {e}", param="messages") from None
    if s.allow_local_images is None:
        raise APIError(400, "local image paths are disabled (start the server with --allow-local-images DIR)", param="messages")
    root = s.allow_local_images.resolve()
    path = Path(url.removeprefix("file://"))
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root):
        raise APIError(400, f"image path outside the allowed folder {root}", param="messages")
    if not path.is_file():
        raise APIError(400, f"image not found: {url}", param="messages")
    return path.read_bytes()


def _messages(req: P.ChatCompletionRequest, s: ServeSettings) -> tuple[list[dict], list[str], list[str | None]]:
    """The request's messages (OpenAI parts as they came), its image URLs and their `detail`."""
    messages, urls, details = [], [], []
    for m in req.messages:
        if isinstance(m.content, list):
            for part in m.content:
                if isinstance(part, P.ImagePart):
                    urls.append(part.image_url.url)
                    details.append(part.image_url.detail)
        messages.append(m.model_dump(include={"role", "content", "tool_calls", "tool_call_id"}, exclude_none=True))
    if len(urls) > s.max_images:
        raise APIError(400, f"too many images: {len(urls)} > {s.max_images}", param="messages")
    return messages, urls, details


def _load_images(urls: list[str], s: ServeSettings) -> list[bytes]:
    """Every image's bytes, its size checked from the header against the pixel limits (worker thread)."""
    images, total = [], 0
    for url in urls:
        data = _image_bytes(url, s)
        w, h = image_size(data)
        if w * h > s.max_image_pixels:
            raise APIError(400, f"image of {w}x{h} pixels is over the limit of {s.max_image_pixels:,} per image",
                           param="messages")
        total += w * h
        if total > s.max_request_pixels:
            raise APIError(400, f"images of this request are over the limit of {s.max_request_pixels:,} pixels",
                           param="messages")
        images.append(data)
    return images


def _logprobs(tokenizer, token: int, logprob: float, top: list[tuple[int, float]] | None) -> dict:
    def entry(t: int, lp: float) -> dict:
        b = tokenizer.token_bytes(t)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

    return {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in (top or [])]}


class Guard:
    """ASGI middleware in front of every route: the API key on /v1/* (compared in constant time),
    then the body limit: a body over `max_body_bytes` gets 413 whether or not it says its length
    (a chunked body is read up to the limit, never further). Plain ASGI, so the routes still see
    a client's disconnect."""

    def __init__(self, app, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        key = self.settings.api_key
        if key and scope["path"].startswith("/v1/"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), f"Bearer {key}".encode()):
                self.metrics.errors.labels("authentication_error").inc()
                return await _answer(send, 401, P.error_body("invalid or missing API key", "authentication_error",
                                                             code="invalid_api_key"))
        limit = self.settings.max_body_bytes
        too_large = P.error_body(f"request body over {limit} bytes")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _answer(send, 413, too_large)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _answer(send, 413, too_large)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _answer(send, status: int, obj: dict) -> None:
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(cm: ChatModel, settings: ServeSettings) -> FastAPI:
    engine = Engine(cm.model, cm.tokenizer, settings.max_batch, settings.max_queue, settings.max_context,
                    prefix_cache_bytes=settings.prefix_cache_bytes, reserve_bytes=settings.image_cache_bytes)
    image_cache = PatchCache(settings.image_cache_bytes) if settings.image_cache_bytes > 0 else None
    metrics = Metrics(engine, image_cache)
    engine.on_step = metrics.batch.observe

    to_loop: ToLoop | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal to_loop
        to_loop = ToLoop(asyncio.get_running_loop())
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    gen = cm.generation_config  # the checkpoint's defaults for fields a request leaves out
    default_temperature = float(gen.get("temperature", 1.0)) if gen.get("do_sample", False) else 0.0
    default_top_p = float(gen.get("top_p", 1.0)) if gen.get("do_sample", False) else 1.0

    app = FastAPI(title="phi4rv", lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(Guard, settings=settings, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        metrics.errors.labels(e.body["error"]["type"]).inc()
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        # The deepest error names the field best (a union such as `content` reports every branch).
        err = max(e.errors(), key=lambda x: len(x.get("loc", ())), default={})
        if err.get("type") == "json_invalid":
            metrics.errors.labels("invalid_request_error").inc()
            return JSONResponse(P.error_body("request body is not valid JSON"), status_code=400)
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        metrics.errors.labels("invalid_request_error").inc()
        message = f"{where}: {err.get('msg', 'invalid request')}" if where else err.get("msg", "invalid request")
        return JSONResponse(P.error_body(message, param=where or None), status_code=400)

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.running, "queued": engine.queue_depth}

    @app.get("/metrics")
    async def metrics_route():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.served_model_name, "object": "model", "created": 0, "owned_by": "phi4rv"}]}

    def expired_error(e: BaseException) -> APIError:
        if isinstance(e, TimeoutError):
            metrics.requests.labels("timeout").inc()
            return APIError(504, str(e), "timeout")
        if isinstance(e, ShuttingDown):
            metrics.requests.labels("error").inc()
            return APIError(503, str(e), "server_busy")
        metrics.requests.labels("error").inc()
        return APIError(500, f"generation failed: {e}", "server_error")

    async def start(request: Request, job: Job) -> Run:
        """Prepare (images, prompt, grammar: in a worker thread, within `image_timeout`) and queue."""
        started = time.monotonic()
        if engine.queue_depth >= settings.max_queue:  # before any image work
            metrics.requests.labels("rejected").inc()
            raise APIError(503, f"server busy: queue full ({settings.max_queue} waiting)", "server_busy",
                           headers={"Retry-After": "1"})

        def prepare():
            images = _load_images(job.urls, settings)
            prepared, info = cm.prepare(job.messages, images, job.mode, job.details,
                                        special_tokens=settings.allow_special_tokens, patch_cache=image_cache)
            grammar = Grammar.from_schema(job.schema, cm.tokenizer) if job.schema is not None else None
            return prepared, info, grammar

        try:
            prepared, info, grammar = await asyncio.wait_for(run_in_threadpool(prepare), timeout=settings.image_timeout)
        except asyncio.TimeoutError:
            raise APIError(400, f"preparing the request took over {settings.image_timeout:g}s", param="messages") from None
        except GrammarError as e:
            raise APIError(400, str(e), param=job.schema_param) from None
        except (ImageError, ValueError) as e:
            raise APIError(400, str(e), param="messages") from None
        usage = info["usage"]
        room = engine.slot_len - usage["prompt_tokens"] - engine.slack
        try:
            params = GenerationParams(
                max_new_tokens=job.max_tokens or max(1, min(settings.default_max_tokens, room)),
                sampling=SamplingParams(
                    temperature=default_temperature if job.temperature is None else job.temperature,
                    top_p=default_top_p if job.top_p is None else job.top_p,
                ),
                seed=job.seed,
                stop_ids=cm.stop_ids(),
                stop_strings=tuple(x for x in job.stop if x),
                thinking_budget=job.thinking_budget,
                top_logprobs=job.top_logprobs,
                logprobs=job.logprobs,
                grammar=grammar,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from None

        queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        ereq = EngineRequest(prepared, params, lambda ev: to_loop.put(queue, ev), timeout=settings.request_timeout)
        try:
            engine.submit(ereq)
        except QueueFull as e:
            metrics.requests.labels("rejected").inc()
            raise APIError(503, f"server busy: {e}", "server_busy", headers={"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e), "server_busy") from None
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        metrics.prompt_tokens.inc(usage["prompt_tokens"])

        async def events(poll_disconnect: bool = False):
            """The request's tokens. A non-streaming handler is not told that its client left, so it
            looks twice a second (a streaming response watches for that itself)."""
            first, checked = True, time.monotonic()
            try:
                while True:
                    if not poll_disconnect:
                        ev = await queue.get()
                    else:
                        try:
                            ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                        except asyncio.TimeoutError:
                            ev = None
                    if poll_disconnect and time.monotonic() - checked > 0.5:
                        checked = time.monotonic()
                        if await request.is_disconnected():
                            raise asyncio.CancelledError
                    if ev is None:
                        continue
                    if isinstance(ev, BaseException):
                        raise ev
                    if first:
                        metrics.ttft.observe(time.monotonic() - started)
                        first = False
                    metrics.token()
                    yield ev
                    if ev.finish_reason is not None:
                        return
            finally:
                ereq.cancel()  # no-op once finished; frees the slot if the client went away

        def finish(n_tokens: int, thinking: int, reason: str) -> dict:
            metrics.latency.observe(time.monotonic() - started)
            metrics.requests.labels("ok").inc()
            return {**usage, "completion_tokens": n_tokens, "thinking_tokens": thinking,
                    "answer_tokens": n_tokens - thinking, "finish_reason": reason}

        return Run(events, finish)

    async def collect(run: Run, logprobs: bool = False) -> Collected:
        out = Collected()
        try:
            async for ev in run.events(poll_disconnect=True):
                out.text += ev.text
                out.tokens += 1
                out.thinking += ev.thinking
                if logprobs:
                    out.logprobs.append(_logprobs(cm.tokenizer, ev.token_id, ev.logprob, ev.top_logprobs))
                out.reason = ev.finish_reason or out.reason
        except (TimeoutError, ShuttingDown) as e:
            raise expired_error(e) from None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise expired_error(e) from None
        return out

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        _check_model(body.model, settings)
        if body.n != 1:
            raise APIError(400, "n > 1 is not supported", param="n")
        mode = P.mode_for(body.reasoning_effort)
        fns, schema, param = _structure(body.tools, body.tool_choice, _chat_format(body.response_format))
        messages, urls, details = _messages(body, settings)
        try:
            messages = tools.conversation(messages, fns, body.tool_choice)
        except tools.ToolError as e:
            raise APIError(400, str(e), param="messages") from None
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        job = Job(messages, urls, details, mode, body.max_completion_tokens or body.max_tokens, body.temperature,
                  body.top_p, body.seed, stop, body.thinking_budget, (body.top_logprobs or 0) if body.logprobs else 0,
                  schema, param, bool(body.logprobs))
        run = await start(request, job)
        cid, created = P.completion_id(), P.now()
        calls_possible = bool(fns) and body.tool_choice != "none"
        if body.stream:
            return StreamingResponse(
                _stream(run, cm, body, mode, cid, created, metrics, fns if calls_possible else []),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        out = await collect(run, body.logprobs)
        parsed = parse_completion(out.text, mode, stopped_by_length=out.reason == "length")
        u = run.finish(out.tokens, out.thinking, out.reason)
        message = {"role": "assistant", "content": parsed.answer, "reasoning_content": parsed.thinking}
        reason = out.reason
        calls = tools.parse_calls(parsed.answer, fns) if calls_possible else None
        if calls:
            message.update(content=None, tool_calls=[c.to_openai() for c in calls])
            reason = "tool_calls"
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": settings.served_model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": reason,
                         "logprobs": {"content": out.logprobs} if body.logprobs else None}],
            "usage": P.usage_body(u),
        }

    @app.post("/v1/responses")
    async def responses(body: P.ResponsesRequest, request: Request):
        _check_model(body.model, settings)
        reasoning = body.reasoning or {}
        effort = reasoning.get("effort")
        if effort not in (None, "none", "minimal", "low", "medium", "high"):
            raise APIError(400, f"unknown reasoning effort {effort!r}", param="reasoning.effort")
        mode = P.mode_for(effort)
        fns, schema, param = _structure(body.tools, body.tool_choice, _responses_format(body.text))
        try:
            messages, urls, details = _response_input(body)
            messages = tools.conversation(messages, fns, body.tool_choice)
        except tools.ToolError as e:
            raise APIError(400, str(e), param="input") from None
        if len(urls) > settings.max_images:
            raise APIError(400, f"too many images: {len(urls)} > {settings.max_images}", param="input")
        job = Job(messages, urls, details, mode, body.max_output_tokens, body.temperature, body.top_p, None, [],
                  None, 0, schema, param)
        run = await start(request, job)
        rid, created = "resp_" + uuid.uuid4().hex[:24], P.now()
        calls_possible = bool(fns) and body.tool_choice != "none"
        summary = reasoning.get("summary") is not None
        if body.stream:
            return StreamingResponse(
                _response_stream(run, body, mode, rid, created, metrics, fns if calls_possible else [], summary,
                                 settings.served_model_name),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        out = await collect(run)
        parsed = parse_completion(out.text, mode, stopped_by_length=out.reason == "length")
        u = run.finish(out.tokens, out.thinking, out.reason)
        calls = tools.parse_calls(parsed.answer, fns) if calls_possible else None
        items = P.response_items(parsed.thinking, parsed.answer, calls, summary)
        return P.response_body(rid, created, settings.served_model_name, items, u, body)

    @app.post("/v1/grounding")
    async def grounding(body: P.GroundingRequest):
        """phi4rv helper: a model's grounding answer -> the box in pixels and the click point."""
        g = ground(body.text, body.width, body.height)
        if g is None:
            raise APIError(400, "no valid [x1, y1, x2, y2] box (fractions 0-1) in the text", param="text")
        return g.to_json()

    return app


class ToLoop:
    """Hands the engine thread's events to the event loop's queues: one loop wake-up for all the
    events of a decode step, not one per request per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock, self.pending, self.scheduled = loop, threading.Lock(), [], False

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.pending.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for queue, item in items:
            queue.put_nowait(item)


@dataclass
class Job:
    """What one API request asks the engine for, whichever API it came through."""

    messages: list[dict]
    urls: list[str]
    details: list[str | None]
    mode: str
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: list[str]
    thinking_budget: int | None
    top_logprobs: int
    schema: dict | None  # the answer's JSON schema (structured output or forced tool call)
    schema_param: str | None
    logprobs: bool = False


@dataclass
class Run:
    events: Any  # async generator of TokenEvent
    finish: Any  # (tokens, thinking tokens, reason) -> usage dict


@dataclass
class Collected:
    text: str = ""
    tokens: int = 0
    thinking: int = 0
    reason: str = "stop"
    logprobs: list = field(default_factory=list)


def _check_model(name: str, s: ServeSettings) -> None:
    if name != s.served_model_name:
        raise APIError(404, f"model {name!r} not found; this server serves {s.served_model_name!r}",
                       param="model", code="model_not_found")


def _chat_format(fmt: P.ResponseFormat | None) -> tuple[dict | None, str]:
    if fmt is None or fmt.type == "text":
        return None, "response_format"
    if fmt.type == "json_object":
        return JSON_OBJECT_SCHEMA, "response_format"
    if fmt.json_schema is None or not fmt.json_schema.schema_:
        raise APIError(400, "response_format json_schema needs a non-empty 'schema'", param="response_format.json_schema")
    return fmt.json_schema.schema_, "response_format.json_schema"


def _responses_format(text: dict | None) -> tuple[dict | None, str]:
    fmt = (text or {}).get("format") or {"type": "text"}
    kind = fmt.get("type")
    if kind == "text":
        return None, "text.format"
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA, "text.format"
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict) or not fmt["schema"]:
            raise APIError(400, "text.format json_schema needs a non-empty 'schema'", param="text.format.schema")
        return fmt["schema"], "text.format.schema"
    raise APIError(400, f"unknown text.format type {kind!r}", param="text.format.type")


def _structure(tool_list, choice, fmt: tuple[dict | None, str]) -> tuple[list, dict | None, str | None]:
    """The functions offered and the answer's schema: a forced tool call's, else the format's."""
    try:
        fns = tools.functions(tool_list or [])
        call = tools.call_schema(fns, choice)
    except tools.ToolError as e:
        raise APIError(400, str(e), param="tools" if "tool_choice" not in str(e) else "tool_choice") from None
    if call is not None:
        return fns, call, "tools"
    return fns, fmt[0], fmt[1]


def _response_input(body: P.ResponsesRequest) -> tuple[list[dict], list[str], list[str | None]]:
    """Responses API input items -> chat messages (OpenAI parts), image URLs and details."""
    messages: list[dict] = []
    urls: list[str] = []
    details: list[str | None] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    for item in items:
        kind = item.get("type", "message")
        if kind == "function_call":
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": item.get("call_id", ""), "type": "function",
                 "function": {"name": item.get("name", ""), "arguments": item.get("arguments", "{}")}}]})
            continue
        if kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": str(item.get("output", ""))})
            continue
        if kind != "message" or item.get("role") not in ("user", "assistant", "system", "developer"):
            raise APIError(400, f"unsupported input item {kind!r} / role {item.get('role')!r}", param="input")
        content = item.get("content")
        if isinstance(content, str):
            messages.append({"role": item["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, "input message content must be a string or a list of parts", param="input")
        parts = []
        for part in content:
            ptype = part.get("type") if isinstance(part, dict) else None
            if ptype in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif ptype == "input_image" and isinstance(part.get("image_url"), str):
                urls.append(part["image_url"])
                details.append(part.get("detail") if part.get("detail") in ("low", "high", "auto") else None)
                parts.append({"type": "image"})
            else:
                raise APIError(400, f"unsupported input content part {ptype!r}", param="input")
        messages.append({"role": item["role"], "content": parts})
    return messages, urls, details


class _Trimmed:
    """Streamed answer text with the whitespace that `parse_completion` strips held back: leading
    whitespace is dropped, trailing whitespace is sent only once more text follows it."""

    def __init__(self):
        self.started, self.held = False, ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body):]
        return body


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(run: Run, cm: ChatModel, body: P.ChatCompletionRequest, mode: str, cid: str, created: int, metrics,
                  fns: list):
    """Chat completion chunks. With tools on offer the answer is held back until it is known to
    be a call (`tool_calls` delta) or text (`content` delta); the reasoning streams as it comes."""
    model = body.model
    splitter = CompletionSplitter(mode)
    yield _sse(P.chunk(cid, model, created, {"role": "assistant", "content": ""}))
    tokens = thinking = 0
    reason = "stop"
    held, trim = "", _Trimmed()
    try:
        async for ev in run.events():
            tokens += 1
            thinking += ev.thinking
            logprobs = None
            if body.logprobs:
                logprobs = {"content": [_logprobs(cm.tokenizer, ev.token_id, ev.logprob, ev.top_logprobs)]}
            deltas = splitter.push(ev.text, final=ev.finish_reason is not None)
            if fns:
                held += "".join(d.text for d in deltas if d.kind == "answer")
                deltas = [d for d in deltas if d.kind != "answer"]
            deltas = [d if d.kind != "answer" else type(d)(d.kind, trim.push(d.text)) for d in deltas]
            deltas = [d for d in deltas if d.text]
            for i, d in enumerate(deltas or [None]):
                if d is None and logprobs is None:
                    continue
                delta = {} if d is None else {("reasoning_content" if d.kind == "thinking" else "content"): d.text}
                yield _sse(P.chunk(cid, model, created, delta, logprobs=logprobs if i == 0 else None))
            if ev.finish_reason is not None:
                reason = ev.finish_reason
    except Exception as e:
        kind = "timeout" if isinstance(e, TimeoutError) else "server_busy" if isinstance(e, ShuttingDown) else "server_error"
        metrics.requests.labels("timeout" if kind == "timeout" else "error").inc()
        yield _sse(P.error_body(str(e), kind))
        yield "data: [DONE]\n\n"
        return
    if fns:
        calls = tools.parse_calls(held.strip(), fns)
        if calls:
            reason = "tool_calls"
            delta = {"tool_calls": [{"index": k, **c.to_openai()} for k, c in enumerate(calls)]}
            yield _sse(P.chunk(cid, model, created, delta))
        elif held:
            yield _sse(P.chunk(cid, model, created, {"content": held.strip()}))
    u = run.finish(tokens, thinking, reason)
    yield _sse(P.chunk(cid, model, created, {}, finish=reason))
    if body.stream_options and body.stream_options.include_usage:
        yield _sse({**P.chunk(cid, model, created, None), "usage": P.usage_body(u)})
    yield "data: [DONE]\n\n"


async def _response_stream(run: Run, body: P.ResponsesRequest, mode: str, rid: str, created: int, metrics,
                           fns: list, summary: bool, model: str):
    """Responses API events, in the order the API sends them: created, in_progress, then per
    output item added -> deltas -> done, and completed (or failed)."""
    seq = 0

    def event(kind: str, **fields) -> str:
        nonlocal seq
        seq += 1
        obj = {"type": kind, "sequence_number": seq, **fields}
        return f"event: {kind}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"

    shell = P.response_body(rid, created, model, [], None, body, status="in_progress")
    yield event("response.created", response=shell)
    yield event("response.in_progress", response=shell)
    splitter = CompletionSplitter(mode)
    tokens = thinking_tokens = 0
    reason, raw, thinking = "stop", "", ""
    msg_id, index, opened, trim = "msg_" + uuid.uuid4().hex[:24], 0, False, _Trimmed()
    try:
        async for ev in run.events():
            tokens += 1
            thinking_tokens += ev.thinking
            raw += ev.text
            for d in splitter.push(ev.text, final=ev.finish_reason is not None):
                if d.kind == "thinking":
                    thinking += d.text
                    continue
                if fns:
                    continue  # a call or text: known at the end
                text = trim.push(d.text)
                if not text:
                    continue
                if not opened:
                    index = 1 if thinking.strip() else 0
                    if index:
                        yield event("response.output_item.added", output_index=0,
                                    item=P.reasoning_item(thinking.strip(), summary))
                        yield event("response.output_item.done", output_index=0,
                                    item=P.reasoning_item(thinking.strip(), summary))
                    item = {"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}
                    yield event("response.output_item.added", output_index=index, item=item)
                    yield event("response.content_part.added", item_id=msg_id, output_index=index, content_index=0,
                                part={"type": "output_text", "text": "", "annotations": []})
                    opened = True
                yield event("response.output_text.delta", item_id=msg_id, output_index=index, content_index=0,
                            delta=text, logprobs=[])
            if ev.finish_reason is not None:
                reason = ev.finish_reason
    except Exception as e:
        metrics.requests.labels("timeout" if isinstance(e, TimeoutError) else "error").inc()
        failed = P.response_body(rid, created, model, [], None, body, status="failed")
        failed["error"] = {"code": "server_error", "message": str(e)}
        yield event("response.failed", response=failed)
        return
    parsed = parse_completion(raw, mode, stopped_by_length=reason == "length")
    calls = tools.parse_calls(parsed.answer, fns) if fns else None
    items = P.response_items(parsed.thinking, parsed.answer, calls, summary, msg_id=msg_id)
    u = run.finish(tokens, thinking_tokens, reason)
    if opened:
        text = items[-1]["content"][0]["text"]
        yield event("response.output_text.done", item_id=msg_id, output_index=index, content_index=0, text=text,
                    logprobs=[])
        yield event("response.content_part.done", item_id=msg_id, output_index=index, content_index=0,
                    part=items[-1]["content"][0])
        yield event("response.output_item.done", output_index=index, item=items[-1])
    else:
        for k, item in enumerate(items):
            yield event("response.output_item.added", output_index=k, item=item)
            yield event("response.output_item.done", output_index=k, item=item)
    final = P.response_body(rid, created, model, items, u, body)
    yield event("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)


def run(app: FastAPI, host: str, port: int, log_level: str = "warning") -> None:
    """Serve until SIGINT/SIGTERM. On the signal the engine stops first, so every queued and
    running request gets its final answer (503) before connections are drained."""
    import uvicorn

    engine = app.state.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            threading.Thread(target=engine.stop, daemon=True).start()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)).run()
