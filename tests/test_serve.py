"""`phi4rv serve` as a real process on 127.0.0.1, driven by the official openai client."""

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import httpx
import openai
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from phi4rv.chat_model import ChatModel
from phi4rv.processing.image import process_image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "phi4rv", "serve", "--model", str(ckpt), "--port", str(self.port),
               "--served-model-name", "tiny", *map(str, extra)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.time() + 90
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError("server did not start")

    def client(self, key="unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def images_root(tmp_path_factory, images_dir):
    root = tmp_path_factory.mktemp("served_images")
    for p in images_dir.iterdir():
        (root / p.name).write_bytes(p.read_bytes())
    return root


@pytest.fixture(scope="module")
def server(tiny_ckpt, images_root):
    s = Server(tiny_ckpt, "--max-batch", "4", "--allow-local-images", images_root, "--default-max-tokens", "16")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small_server(tiny_ckpt):
    """One slot, one queue place, a short timeout and an API key: the limits are easy to hit."""
    s = Server(tiny_ckpt, "--max-batch", "1", "--max-queue", "1", "--request-timeout", "3", "--api-key", "sekret")
    yield s
    s.stop()


def data_uri(path_or_bytes, mime="image/png") -> str:
    raw = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def user(text, *urls):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def test_plain_completion_models_health(server):
    c = server.client()
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_greedy_http_equals_cli(server, tiny_ckpt, images_dir):
    prompt = "What is in this picture?"
    r = server.client().chat.completions.create(
        model="tiny", messages=user(prompt, data_uri(images_dir / "photo.jpg", "image/jpeg")), max_tokens=12,
        temperature=0, reasoning_effort="high")
    cli = subprocess.run([sys.executable, "-m", "phi4rv", "chat", "--model", str(tiny_ckpt), "--image",
                          str(images_dir / "photo.jpg"), "--temperature", "0", "--max-new-tokens", "12", "--mode", "think",
                          "--json", prompt], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    local = json.loads(cli.stdout)
    msg = r.choices[0].message
    assert (msg.content, msg.model_extra.get("reasoning_content")) == (local["answer"], local["thinking"])
    assert r.usage.completion_tokens == len(local["token_ids"])
    assert r.usage.prompt_tokens == local["usage"]["prompt_tokens"]
    assert r.usage.prompt_tokens_details.model_dump()["image_tokens"] == local["usage"]["image_tokens"] > 0


def test_stream_equals_non_stream(server):
    c = server.client()
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Tell me"}], max_tokens=20, temperature=0)
    full = c.chat.completions.create(**kw)
    content, reasoning, usage, finish = "", "", None, None
    for ch in c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage:
            usage = ch.usage
        for choice in ch.choices:
            content += choice.delta.content or ""
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            finish = choice.finish_reason or finish
    m = full.choices[0].message
    assert content.strip() == (m.content or "") and (reasoning.strip() or None) == m.model_extra.get("reasoning_content")
    assert usage.completion_tokens == full.usage.completion_tokens and finish == full.choices[0].finish_reason


def test_modes_and_thinking_budget(server, tiny_ckpt):
    c = server.client()
    msgs = [{"role": "user", "content": "Solve 2+2"}]
    think = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=0, reasoning_effort="high",
                                      extra_body={"thinking_budget": 5})
    details = think.usage.completion_tokens_details
    assert think.choices[0].message.model_extra["reasoning_content"]
    assert 5 <= details.reasoning_tokens < think.usage.completion_tokens  # closed by the budget, then answered
    nothink = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, reasoning_effort="none")
    assert nothink.choices[0].message.model_extra.get("reasoning_content") is None
    assert nothink.usage.completion_tokens_details.reasoning_tokens == 0
    auto = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    from phi4rv.chat_model import ChatModel
    from phi4rv.generation.sampling import SamplingParams

    cm = ChatModel.load(tiny_ckpt)  # auto: the model's own choice, the same as in process
    local = cm.chat(msgs, mode="auto", params=cm.params(max_new_tokens=8, sampling=SamplingParams(temperature=0)))
    msg = auto.choices[0].message
    assert (msg.content, msg.model_extra.get("reasoning_content")) == (local.answer, local.thinking)


def test_local_image_path_and_logprobs(server, images_root):
    r = server.client().chat.completions.create(
        model="tiny", messages=user("Where?", "desktop_screenshot.png"), max_tokens=4, temperature=0, logprobs=True,
        top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens == 4
    for e in lp:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5)
    assert r.usage.prompt_tokens_details.model_dump()["image_tokens"] > 0


def test_concurrent_greedy_requests_equal_sequential(server, images_dir):
    c = server.client()
    prompts = [("Hi", []), ("Describe", [data_uri(images_dir / "photo.jpg", "image/jpeg")]), ("What app?", [data_uri(images_dir / "desktop_screenshot.png")]),
               ("A longer question about nothing at all", []), ("Two images", [data_uri(images_dir / "photo.jpg", "image/jpeg")] * 2), ("x", [])]
    ask = lambda p: c.chat.completions.create(model="tiny", messages=user(p[0], *p[1]), max_tokens=10, temperature=0,  # noqa: E731
                                              reasoning_effort="none").choices[0].message.content
    sequential = [ask(p) for p in prompts]
    results = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(prompts[i]))) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == sequential


def post(server, body, key=None, raw=None):
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    content = raw if raw is not None else json.dumps(body)
    return httpx.post(server.url + "/v1/chat/completions", content=content, headers=headers, timeout=60)


def png_bytes(size=(32, 32), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_input_gets_4xx_and_server_keeps_serving(server):
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    img = lambda uri: {**ok, "messages": user("look", uri)}  # noqa: E731
    cases = {
        "malformed json": (None, "{not json"),
        "wrong type": ({**ok, "max_tokens": "many"}, None),
        "missing messages": ({"model": "tiny"}, None),
        "empty messages": ({**ok, "messages": []}, None),
        "bad role": ({**ok, "messages": [{"role": "wizard", "content": "x"}]}, None),
        "bad base64": (img("data:image/png;base64,@@@notbase64@@@"), None),
        "not an image": (img(data_uri(b"hello, this is text")), None),
        "truncated image": (img(data_uri(png_bytes((64, 64))[:60])), None),
        "over the pixel limit": (img(data_uri(png_bytes((10000, 9000), "1"))), None),
        "too many images": ({**ok, "messages": user("many", *[data_uri(png_bytes())] * 9)}, None),
        "prompt longer than context": ({**ok, "messages": [{"role": "user", "content": "word " * 5000}]}, None),
        "n > 1": ({**ok, "n": 2}, None),
        "temperature out of range": ({**ok, "temperature": 9}, None),
        "remote url disabled": (img("http://127.0.0.1:9/x.png"), None),
        "path outside allowed folder": (img("/etc/passwd"), None),
    }
    for name, (body, raw) in cases.items():
        r = post(server, body, raw=raw)
        assert r.status_code == 400, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error", name
    r = post(server, {**ok, "model": "gpt-9"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert post(server, ok).status_code == 200


def test_api_key_queue_full_disconnect_and_timeout(small_server):
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    assert post(small_server, ok).status_code == 401
    assert post(small_server, ok, key="wrong").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        small_server.client("wrong").chat.completions.create(**ok)
    assert post(small_server, ok, key="sekret").status_code == 200

    # one slot + one queue place: of four simultaneous long requests, some must get 503 + Retry-After
    long = {**ok, "max_tokens": 400}
    codes, headers = [], []

    def fire():
        r = post(small_server, long, key="sekret")
        codes.append(r.status_code)
        headers.append(r.headers.get("retry-after"))

    threads = [threading.Thread(target=fire) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert 503 in codes and set(codes) <= {200, 503, 504}
    assert all(h is not None for c, h in zip(codes, headers) if c == 503)

    # a streaming client that goes away frees the only slot
    with httpx.stream("POST", small_server.url + "/v1/chat/completions", timeout=30,
                      json={**ok, "max_tokens": 3000, "stream": True}, headers={"authorization": "Bearer sekret"}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    t0 = time.time()
    assert post(small_server, ok, key="sekret").status_code == 200
    assert time.time() - t0 < 3  # the abandoned request (3000 tokens) no longer holds the slot

    # past --request-timeout a request gets 504 and the slot comes back
    r = post(small_server, {**ok, "max_tokens": 3500}, key="sekret")
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    assert post(small_server, ok, key="sekret").status_code == 200


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics(server):
    before = _samples(httpx.get(server.url + "/metrics").text)
    r = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "m"}], max_tokens=2,
                                                temperature=0)
    text = httpx.get(server.url + "/metrics").text
    after = _samples(text)

    def grew(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    # one more successful request, its tokens and one more observation in each latency histogram
    assert sum(grew(k) for k in after if k.startswith("phi4rv_requests_total")) == 1
    assert grew("phi4rv_generated_tokens_total") == r.usage.completion_tokens
    assert grew("phi4rv_prompt_tokens_total") == r.usage.prompt_tokens
    assert grew("phi4rv_request_latency_seconds_count") == 1 and grew("phi4rv_time_to_first_token_seconds_count") == 1
    assert grew("phi4rv_request_latency_seconds_sum") > 0
    assert after["phi4rv_queue_depth"] == 0 and after["phi4rv_running_requests"] == 0
    for name in ("phi4rv_request_errors_total", "phi4rv_batch_size_bucket", "phi4rv_tokens_per_second"):
        assert name in text



def test_an_image_sent_again_comes_from_the_image_cache(server):
    img = Image.new("RGB", (90, 70), (17, 99, 201))  # a colour no other test sends
    buf = io.BytesIO()
    img.save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "?"}]}]
    seen, answers = [], []
    for _ in range(2):
        r = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0)
        answers.append(r.choices[0].message.content)
        seen.append(_samples(httpx.get(server.url + "/metrics").text))
    assert answers[0] == answers[1]
    assert seen[1]["phi4rv_image_cache_bytes"] == seen[0]["phi4rv_image_cache_bytes"] > 0  # stored once
    assert seen[1]["phi4rv_image_cache_hit_rate"] > seen[0]["phi4rv_image_cache_hit_rate"]  # then found

JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**7) | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": st.sampled_from(
        ["data:image/png;base64,AAAA", "data:,x", "photo.jpg", "http://127.0.0.1:9/a.png", "data:image/png;base64,"
         + base64.b64encode(png_bytes((8, 8))).decode()])})}),
    JSON,
)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"])},
                                optional={"content": st.one_of(st.text(max_size=40), st.lists(PART, max_size=3), JSON)})
FIELDS = {
    "model": st.sampled_from(["tiny", "other"]) | JSON,
    "messages": st.lists(MESSAGE, max_size=3) | JSON,
    "max_tokens": st.integers(-2, 4) | JSON,
    "temperature": st.floats(-1, 3) | JSON,
    "top_p": st.floats(-0.5, 1.5) | JSON,
    "stream": st.booleans() | JSON,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=2) | JSON,
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(-1, 25),
    "n": st.integers(0, 3),
    "seed": st.integers(-10, 10) | JSON,
    "reasoning_effort": st.sampled_from(["none", "high", "low", "bogus"]) | JSON,
    "thinking_budget": st.integers(-1, 3) | JSON,
    "stream_options": JSON,
}
# Arbitrary bodies, and valid ones with a few fields replaced by fuzz (so generation runs too).
BODY = st.one_of(
    st.fixed_dictionaries({}, optional=FIELDS),
    st.fixed_dictionaries(
        {"model": st.just("tiny"), "messages": st.just([{"role": "user", "content": "hi"}]), "max_tokens": st.just(3)},
        optional={k: v for k, v in FIELDS.items() if k not in ("model", "max_tokens", "messages")},
    ),
)


def test_fuzzed_bodies_never_5xx(server):
    seen = []

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              phases=[Phase.explicit, Phase.generate])
    @given(BODY)
    def check(body):
        r = post(server, body)
        seen.append(r.status_code)
        assert r.status_code < 500, (body, r.text)

    check()
    assert len(seen) >= 300 and any(c == 200 for c in seen) and any(c == 400 for c in seen)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_server_usage_matches_processing(server, images_dir, tiny_ckpt):
    cm = ChatModel.load(tiny_ckpt, device="cpu")
    grid = process_image(images_dir / "photo.jpg", cm.image_cfg).grid
    r = server.client().chat.completions.create(
        model="tiny", messages=user("?", data_uri(images_dir / "photo.jpg", "image/jpeg")), max_tokens=1)
    assert r.usage.prompt_tokens_details.model_dump()["image_tokens"] == grid[0] * grid[1]


@pytest.mark.parametrize("content, match", [
    ([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], "messages"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "ultra"}}], "detail"),
    ("<image>\n<image>\nTwo tags, no image", "<image> tag"),
])
def test_bad_content_is_a_400(server, content, match):
    r = post(server, {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2})
    assert r.status_code == 400 and match in r.json()["error"]["message"] + str(r.json()["error"]["param"]), r.text


def test_image_detail_sets_the_patch_budget(images_dir, tiny_ckpt, tmp_path):
    # A checkpoint allowing 1024 patches, served with a default budget of 64: low = 256, high = 1024.
    ckpt = tmp_path / "wide"
    shutil.copytree(tiny_ckpt, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "max_num_patches": 1024}))
    cm = ChatModel.load(ckpt, device="cpu")
    budgets = {"low": 256, "high": 1024, "auto": 64, None: 64}
    url = data_uri(images_dir / "photo.jpg", "image/jpeg")
    server = Server(ckpt, "--max-num-patches", 64)
    try:
        for detail, budget in budgets.items():
            h, w = process_image(images_dir / "photo.jpg", replace(cm.image_cfg, max_num_patches=budget)).grid
            image = {"url": url, **({"detail": detail} if detail else {})}
            r = server.client().chat.completions.create(
                model="tiny", max_tokens=1, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": image}]}])
            assert r.usage.prompt_tokens_details.model_dump()["image_tokens"] == h * w <= budget
    finally:
        server.stop()
