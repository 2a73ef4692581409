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
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from phi4rv.chat_model import ChatModel, MarkerSplitter
from phi4rv.generation.generate import GenerationParams, TokenEvent
from phi4rv.generation.sampling import SamplingParams
from phi4rv.processing.chat import parse_completion
from phi4rv.processing.image import ImageError, image_size
from phi4rv.serve import protocol as P
from phi4rv.serve.engine import Engine, EngineRequest, QueueFull, ShuttingDown


@dataclass
class ServeSettings:
    served_model_name: str
    api_key: str | None = None
    max_batch: int = 8
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


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.body, self.headers = status, P.error_body(message, type_, param, code), headers


class Metrics:
    def __init__(self, engine: Engine):
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
        messages.append(m.model_dump(include={"role", "content"}))
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
    engine = Engine(cm.model, cm.tokenizer, settings.max_batch, settings.max_queue,
                    prefix_cache_bytes=settings.prefix_cache_bytes)
    metrics = Metrics(engine)
    engine.on_step = metrics.batch.observe

    @asynccontextmanager
    async def lifespan(app: FastAPI):
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

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        started = time.monotonic()
        if body.model != settings.served_model_name:
            raise APIError(404, f"model {body.model!r} not found; this server serves {settings.served_model_name!r}",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, "n > 1 is not supported", param="n")
        mode = P.mode_for(body.reasoning_effort)
        messages, urls, details = _messages(body, settings)
        if engine.queue_depth >= settings.max_queue:  # before any image work
            metrics.requests.labels("rejected").inc()
            raise APIError(503, f"server busy: queue full ({settings.max_queue} waiting)", "server_busy",
                           headers={"Retry-After": "1"})

        def prepare():
            images = _load_images(urls, settings)
            return cm.prepare(messages, images, mode, details, special_tokens=settings.allow_special_tokens)

        try:
            prepared, info = await asyncio.wait_for(run_in_threadpool(prepare), timeout=settings.image_timeout)
        except asyncio.TimeoutError:
            raise APIError(400, f"preparing the request's images took over {settings.image_timeout:g}s",
                           param="messages") from None
        except (ImageError, ValueError) as e:
            raise APIError(400, str(e), param="messages") from None
        usage = info["usage"]
        room = engine.slot_len - usage["prompt_tokens"] - engine.slack
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, min(settings.default_max_tokens, room))
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        try:
            params = GenerationParams(
                max_new_tokens=max_tokens,
                sampling=SamplingParams(
                    temperature=default_temperature if body.temperature is None else body.temperature,
                    top_p=default_top_p if body.top_p is None else body.top_p,
                ),
                seed=body.seed,
                stop_ids=cm.stop_ids(),
                stop_strings=tuple(s for s in stop if s),
                thinking_budget=body.thinking_budget,
                top_logprobs=(body.top_logprobs or 0) if body.logprobs else 0,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from None

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        ereq = EngineRequest(prepared, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev),
                             timeout=settings.request_timeout)
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
        cid, created = P.completion_id(), P.now()

        async def events(poll_disconnect: bool = False):
            """The request's tokens. A non-streaming handler is not told that its client left, so it
            looks twice a second (a streaming response watches for that itself)."""
            first, checked = True, time.monotonic()
            try:
                while True:
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

        if body.stream:
            return StreamingResponse(
                _stream(events(), cm, body, mode, cid, created, finish, metrics),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        text, tokens, thinking, logprobs, reason = "", 0, 0, [], "stop"
        try:
            async for ev in events(poll_disconnect=True):
                text += ev.text
                tokens += 1
                thinking += ev.thinking
                if body.logprobs:
                    logprobs.append(_logprobs(cm.tokenizer, ev.token_id, ev.logprob, ev.top_logprobs))
                reason = ev.finish_reason or reason
        except TimeoutError as e:
            metrics.requests.labels("timeout").inc()
            raise APIError(504, str(e), "timeout") from None
        except ShuttingDown as e:
            metrics.requests.labels("error").inc()
            raise APIError(503, str(e), "server_busy") from None
        except Exception as e:
            metrics.requests.labels("error").inc()
            raise APIError(500, f"generation failed: {e}", "server_error") from None
        parsed = parse_completion(text, mode, stopped_by_length=reason == "length")
        u = finish(tokens, thinking, reason)
        message = {"role": "assistant", "content": parsed.answer, "reasoning_content": parsed.thinking}
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": settings.served_model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": reason,
                         "logprobs": {"content": logprobs} if body.logprobs else None}],
            "usage": P.usage_body(u),
        }

    return app


async def _stream(events, cm: ChatModel, body: P.ChatCompletionRequest, mode: str, cid: str, created: int, finish, metrics):
    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    model = body.model
    splitter = MarkerSplitter(thinking=mode == "think")
    yield sse(P.chunk(cid, model, created, {"role": "assistant", "content": ""}))
    tokens = thinking = 0
    reason = "stop"
    try:
        async for ev in events:
            tokens += 1
            thinking += ev.thinking
            logprobs = None
            if body.logprobs:
                logprobs = {"content": [_logprobs(cm.tokenizer, ev.token_id, ev.logprob, ev.top_logprobs)]}
            deltas = splitter.push(ev.text, final=ev.finish_reason is not None)
            for i, d in enumerate(deltas or [None]):
                if d is None and logprobs is None:
                    continue
                delta = {} if d is None else {("reasoning_content" if d.kind == "thinking" else "content"): d.text}
                yield sse(P.chunk(cid, model, created, delta, logprobs=logprobs if i == 0 else None))
            if ev.finish_reason is not None:
                reason = ev.finish_reason
    except Exception as e:
        metrics.requests.labels("timeout" if isinstance(e, TimeoutError) else "error").inc()
        yield sse(P.error_body(str(e), "timeout" if isinstance(e, TimeoutError) else "server_error"))
        yield "data: [DONE]\n\n"
        return
    u = finish(tokens, thinking, reason)
    yield sse(P.chunk(cid, model, created, {}, finish=reason))
    if body.stream_options and body.stream_options.include_usage:
        yield sse({**P.chunk(cid, model, created, None), "usage": P.usage_body(u)})
    yield "data: [DONE]\n\n"


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
