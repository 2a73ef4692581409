"""One client for OpenAI-compatible chat-completions endpoints (vLLM, Azure, OpenAI, `phi4rv serve`):
the teacher (`data.teacher`), eval's HTTP backend and its judge all talk through it.

- Retries: a timeout, a connection error, HTTP 408/409/425/429 or any 5xx, a reply that is not a
  chat completion, or an error sent inside a stream is tried again, up to `retries` times, after
  `backoff * 2**(n-1)` seconds (jittered to 50-100%, at most `backoff_max`, at least what a
  `Retry-After` header asks); any other status fails at once.
- Images travel as data URLs with the MIME type their bytes show.
- `openai_messages` turns the release's string contents, one `<image>\\n` tag per image, into
  OpenAI content parts with each image where its tag was; `processing.chat.content_text` is the
  way back, so a server rendering the release's template sees the very same prompt.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from phi4rv.processing.chat import IMAGE_TOKEN

RETRY_STATUS = frozenset({408, 409, 425, 429})  # and every 5xx


# ---- images and messages -----------------------------------------------------------------------


def image_mime(data: bytes) -> str:
    """The MIME type an encoded image's first bytes show."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "application/octet-stream"


def data_url(image: bytes | str | Path) -> str:
    """An image (encoded bytes, or a file) as a `data:` URL."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return f"data:{image_mime(data)};base64,{base64.b64encode(data).decode()}"


def content_parts(text: str, images: Iterator[bytes | str | Path]) -> list[dict[str, Any]]:
    """`text` as OpenAI content parts: an `image_url` part for each `<image>` tag (the newline after
    a tag belongs to the image), taking the next of `images`, and the text between as text parts."""
    parts: list[dict[str, Any]] = []
    for k, piece in enumerate(text.split(IMAGE_TOKEN)):
        if k:
            try:
                image = next(images)
            except StopIteration:
                raise ValueError("more <image> tags than images") from None
            parts.append({"type": "image_url", "image_url": {"url": data_url(image)}})
            piece = piece.removeprefix("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def openai_messages(messages: list[dict[str, str]], images: Iterable[bytes | str | Path]) -> list[dict[str, Any]]:
    """Messages with string contents and `<image>` tags -> OpenAI messages, the images (taken in
    order) as data URLs at their tags' places; a content without a tag stays a string."""
    it = iter(images)
    return [{"role": m["role"], "content": content_parts(m["content"], it) if IMAGE_TOKEN in m["content"]
             else m["content"]} for m in messages]


# ---- the client --------------------------------------------------------------------------------


@dataclass
class ChatReply:
    content: str
    reasoning: str | None  # `reasoning_content` / `reasoning`, when the server sends it apart
    finish_reason: str | None
    usage: dict[str, Any]
    attempts: int  # requests sent for this answer
    started: float  # time.perf_counter() when the answered request was sent
    first: float | None  # when its first content or reasoning arrived (streams only)
    ended: float


class ClientError(RuntimeError):
    """A request that failed for good: a status not worth retrying, or retries spent."""

    def __init__(self, message: str, kind: str, attempts: int = 1):
        super().__init__(message)
        self.kind = kind  # http_<status> | timeout | connection | bad_json | bad_response | stream_error | gave_up
        self.attempts = attempts


class _Retry(Exception):
    def __init__(self, message: str, kind: str, wait: float = 0.0):
        super().__init__(message)
        self.kind, self.wait = kind, wait


class ChatClient:
    """POSTs chat-completion bodies to `endpoint` (a base URL such as http://host:8000/v1, or the
    full .../chat/completions URL); a body with `"stream": true` is read as server-sent events.
    Thread-safe; counts requests, retries, errors by kind and tokens in `stats` / `errors`."""

    def __init__(self, endpoint: str, api_key: str | None = None, timeout: float = 120.0, retries: int = 4,
                 backoff: float = 1.0, backoff_max: float = 30.0, max_connections: int = 8):
        url = endpoint.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http(s) URL, got {endpoint!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.endpoint = url
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.timeout, self.retries, self.backoff, self.backoff_max = timeout, retries, backoff, backoff_max
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=httpx.Timeout(timeout), headers=headers,
                                 limits=httpx.Limits(max_connections=max_connections))
        self.lock = threading.Lock()
        self.stats: Counter = Counter()  # requests, retries, prompt_tokens, completion_tokens
        self.errors: Counter = Counter()  # by kind

    def _count(self, counter: Counter, key: str, n: int = 1) -> None:
        with self.lock:
            counter[key] += n

    def complete(self, body: dict[str, Any]) -> ChatReply:
        """The server's answer to `body`, retried as the module says; raises ClientError."""
        last, wait_at_least = "", 0.0
        for attempt in range(1, self.retries + 2):
            if attempt > 1:
                self._count(self.stats, "retries")
                delay = self.backoff * 2 ** (attempt - 2) * (0.5 + random.random() / 2)
                time.sleep(min(self.backoff_max, max(delay, wait_at_least)))
            self._count(self.stats, "requests")
            try:
                reply = self._once(body)
            except _Retry as e:
                self._count(self.errors, e.kind)
                last, wait_at_least = str(e), e.wait
                continue
            except ClientError as e:
                self._count(self.errors, e.kind)
                e.attempts = attempt
                raise
            reply.attempts = attempt
            for key in ("prompt_tokens", "completion_tokens"):
                value = reply.usage.get(key)
                self._count(self.stats, key, value if isinstance(value, int) else 0)
            return reply
        raise ClientError(f"{last} (gave up after {self.retries + 1} attempts)", "gave_up", self.retries + 1)

    def _once(self, body: dict[str, Any]) -> ChatReply:
        started = time.perf_counter()
        try:
            if body.get("stream"):
                with self.http.stream("POST", self.url, json=body) as r:
                    if r.status_code >= 400:
                        self._check(r, r.read().decode(errors="replace"))
                    return self._from_stream(r.iter_lines(), started)
            r = self.http.post(self.url, json=body)
            self._check(r, r.text)
            return self._from_message(r.json(), started)
        except httpx.TimeoutException:
            raise _Retry(f"timeout: no answer within {self.timeout:g} s", "timeout") from None
        except httpx.TransportError as e:
            raise _Retry(f"connection error: {type(e).__name__}: {e}", "connection") from None
        except json.JSONDecodeError:
            raise _Retry("malformed response: not JSON", "bad_json") from None
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise _Retry(f"malformed response: {type(e).__name__}: {e}", "bad_response") from None

    @staticmethod
    def _check(r: httpx.Response, text: str) -> None:
        if r.status_code < 400:
            return
        message, kind = f"HTTP {r.status_code}: {text[:200].strip()}", f"http_{r.status_code}"
        if r.status_code in RETRY_STATUS or r.status_code >= 500:
            try:  # a 429/503 may say how long to wait
                wait = float(r.headers.get("Retry-After") or 0)
            except ValueError:
                wait = 0.0
            raise _Retry(message, kind, wait)
        raise ClientError(message, kind)

    @staticmethod
    def _from_message(obj: dict, started: float) -> ChatReply:
        choice = obj["choices"][0]
        msg = choice["message"]
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        return ChatReply(msg.get("content") or "", reasoning, choice.get("finish_reason"), obj.get("usage") or {},
                         1, started, None, time.perf_counter())

    @staticmethod
    def _from_stream(lines: Iterator[str], started: float) -> ChatReply:
        content, reasoning, usage, finish, first = "", "", None, None, None
        for line in lines:
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise _Retry(f"stream error: {str(chunk['error'])[:200]}", "stream_error")
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
        return ChatReply(content, reasoning or None, finish, usage or {}, 1, started, first, time.perf_counter())

    def close(self) -> None:
        self.http.close()
