"""The OpenAI-compatible client against a real HTTP server on 127.0.0.1: retries and what is not
retried, Retry-After, timeouts, streams, accounting, and images as data URLs at their tags."""

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from phi4rv.client import ChatClient, ClientError, content_parts, image_mime, openai_messages
from phi4rv.processing.chat import content_text


class Server(ThreadingHTTPServer):
    """Answers each POST with the next scripted action: ("json", status, obj, headers) |
    ("raw", status, bytes) | ("sleep", seconds) | ("stream", [events]); then a plain answer."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script: list[tuple] = []
        self.seen: list[tuple[float, str, dict, dict]] = []  # (time, path, headers, body)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def answer(content="4", reasoning=None):
    msg = {"role": "assistant", "content": content, **({"reasoning_content": reasoning} if reasoning else {})}
    return {"choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3}}


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args):
        pass

    def send(self, status, data, headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append((time.monotonic(), self.path, dict(self.headers), body))
        action = self.server.script.pop(0) if self.server.script else ("json", 200, answer(), ())
        try:
            if action[0] == "sleep":
                time.sleep(action[1])
                action = ("json", 200, answer(), ())
            if action[0] == "json":
                self.send(action[1], json.dumps(action[2]).encode(), [("Content-Type", "application/json"), *action[3]])
            elif action[0] == "raw":
                self.send(action[1], action[2])
            else:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for event in action[1]:
                    self.wfile.write(b"data: " + (event if isinstance(event, bytes) else json.dumps(event).encode())
                                     + b"\n\n")
                    self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout)


@pytest.fixture
def server():
    s = Server()
    threading.Thread(target=s.serve_forever, daemon=True).start()
    yield s
    s.shutdown()
    s.server_close()


BODY = {"model": "m", "messages": [{"role": "user", "content": "2+2?"}]}


def test_answer_reasoning_usage_and_headers(server):
    server.script = [("json", 200, answer("4", "2+2 is 4"), ())]
    client = ChatClient(server.url + "/", api_key="sk-test", retries=0)
    r = client.complete(BODY)
    assert (r.content, r.reasoning, r.finish_reason, r.attempts) == ("4", "2+2 is 4", "stop", 1)
    _, path, headers, body = server.seen[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test" and body == BODY
    assert client.stats == {"requests": 1, "prompt_tokens": 10, "completion_tokens": 3}


def test_5xx_and_429_are_retried_after_backoff_and_retry_after(server):
    server.script = [("json", 503, {"error": "busy"}, ()), ("json", 429, {"error": "slow down"}, [("Retry-After", "0.3")])]
    client = ChatClient(server.url, retries=2, backoff=0.01)
    assert client.complete(BODY).attempts == 3
    times = [t for t, *_ in server.seen]
    assert times[2] - times[1] >= 0.3  # the server's Retry-After, though the backoff is shorter
    assert client.errors == {"http_503": 1, "http_429": 1} and client.stats["retries"] == 2


def test_a_client_error_is_not_retried(server):
    server.script = [("json", 400, {"error": {"message": "bad request"}}, ())]
    client = ChatClient(server.url, retries=3, backoff=0.01)
    with pytest.raises(ClientError, match="HTTP 400: .*bad request") as e:
        client.complete(BODY)
    assert (e.value.kind, e.value.attempts, len(server.seen)) == ("http_400", 1, 1)


def test_retries_spent_and_malformed_replies(server):
    server.script = [("raw", 200, b"<html>not json</html>"), ("json", 200, {"choices": []}, ()),
                     ("json", 500, {"error": "boom"}, ())]
    client = ChatClient(server.url, retries=2, backoff=0.01)
    with pytest.raises(ClientError, match=r"HTTP 500.*\(gave up after 3 attempts\)") as e:
        client.complete(BODY)
    assert e.value.kind == "gave_up" and e.value.attempts == 3
    assert client.errors == {"bad_json": 1, "bad_response": 1, "http_500": 1}


def test_a_timeout_is_retried(server):
    server.script = [("sleep", 1.0)]
    client = ChatClient(server.url, timeout=0.3, retries=1, backoff=0.01)
    r = client.complete(BODY)
    assert r.attempts == 2 and r.content == "4" and client.errors == {"timeout": 1}


def test_dead_endpoint_is_a_connection_error():
    with pytest.raises(ClientError, match="connection error"):
        ChatClient("http://127.0.0.1:9/v1", retries=0).complete(BODY)
    with pytest.raises(ValueError, match="http"):
        ChatClient("localhost:8000")


def test_stream_gathers_content_reasoning_finish_and_usage(server):
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
              {"choices": [{"index": 0, "delta": {"reasoning_content": "2+2"}}]},
              {"choices": [{"index": 0, "delta": {"content": "The answer "}}]},
              {"choices": [{"index": 0, "delta": {"content": "is 4"}, "finish_reason": "stop"}]},
              {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}}, b"[DONE]"]
    server.script = [("stream", [{"error": {"message": "overloaded"}}]), ("stream", events)]
    client = ChatClient(server.url, retries=1, backoff=0.01)
    r = client.complete({**BODY, "stream": True})
    assert (r.content, r.reasoning, r.finish_reason, r.usage) == ("The answer is 4", "2+2", "stop",
                                                                  {"prompt_tokens": 7, "completion_tokens": 5})
    assert r.attempts == 2 and client.errors == {"stream_error": 1}
    assert r.started <= r.first <= r.ended


def encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"),
                                       ("WEBP", "image/webp")])
def test_image_mime_is_read_from_the_bytes(fmt, mime):
    assert image_mime(encoded(fmt)) == mime
    assert image_mime(b"hello") == "application/octet-stream"


def test_image_tags_become_parts_at_their_places_and_back(images_dir):
    text = "Compare <image>\nwith <image>\nplease."
    png = encoded("PNG")
    parts = content_parts(text, iter([png, images_dir / "photo.jpg"]))
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert urls[0] == "data:image/png;base64," + base64.b64encode(png).decode()
    assert urls[1].startswith("data:image/jpeg;base64,")
    assert base64.b64decode(urls[1].split(",", 1)[1]) == (images_dir / "photo.jpg").read_bytes()
    assert content_text(parts) == text  # what a server rendering the release's contract sees
    messages = openai_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
                               [png, png])
    assert messages[0] == {"role": "system", "content": "Be brief."} and len(messages[1]["content"]) == 5
    with pytest.raises(ValueError, match="more <image> tags than images"):
        openai_messages([{"role": "user", "content": text}], [png])
