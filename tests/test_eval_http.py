"""`phi4rv eval run --endpoint`: the OpenAI-compatible backend against a real local HTTP server (a
small stdlib app with canned answers, reasoning, usage, 5xx errors and stalls)."""

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_eval_data import BUILDERS, CORRECT, build_all

from phi4rv.cli import main
from phi4rv.eval.backends import HTTPBackend, Query
from phi4rv.eval.records import read_records, records_path
from phi4rv.eval.runner import RunConfig, load_task, run_eval
from phi4rv.eval.tasks import get_task

THINKING = "First guess: (A), or maybe 999 at [0.9, 0.9, 1.0, 1.0]. No."


class Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.answers: dict[str, str] = {}  # prompt text (image tags removed) -> answer
        self.bodies: list[dict] = []
        self.script: list[str] = []  # per request, in order: "500", "503", "400", "sleep:S"; then normal answers
        self.style = "reasoning_content"  # or "inline": <think>…</think> inside the content
        self.delay = 0.0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    server: Stub

    def log_message(self, *args):
        pass

    def _json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        s = self.server
        with s.lock:
            s.bodies.append(body)
            action = s.script.pop(0) if s.script else "ok"
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
        try:
            if action in ("500", "503", "400"):
                return self._json(int(action), {"error": {"message": f"canned {action}"}})
            if action.startswith("sleep:"):
                time.sleep(float(action[6:]))
            time.sleep(s.delay)
            self._answer(body)
        finally:
            with s.lock:
                s.in_flight -= 1

    def _answer(self, body):
        s = self.server
        parts = body["messages"][-1]["content"]
        text = parts if isinstance(parts, str) else "".join(p["text"] for p in parts if p["type"] == "text")
        answer = s.answers.get(text, "no idea")
        effort = body.get("reasoning_effort")
        think = effort == "high" or (effort is None and s.style == "inline")
        reasoning, content = (THINKING, answer) if think else (None, answer)
        if think and s.style == "inline":
            reasoning, content = None, f"<think>{THINKING}</think>\n\n{answer}"
        n_think = len(THINKING.split()) if think else 0
        usage = {"prompt_tokens": 100, "completion_tokens": n_think + len(answer.split()),
                 "completion_tokens_details": {"reasoning_tokens": n_think}}
        if not body.get("stream"):
            msg = {"role": "assistant", "content": content, **({"reasoning_content": reasoning} if reasoning else {})}
            return self._json(200, {"choices": [{"index": 0, "message": msg, "finish_reason": "stop"}], "usage": usage})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def send(obj):
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        send({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        if reasoning:
            send({"choices": [{"index": 0, "delta": {"reasoning_content": reasoning}}]})
        half = len(content) // 2
        for piece in (content[:half], content[half:]):
            send({"choices": [{"index": 0, "delta": {"content": piece}}]})
        send({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        send({"choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def stub():
    server = Stub()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("http_bench"))


def prompt_key(sample) -> str:
    return sample.messages[-1]["content"].replace("<image>\n", "")


def teach(stub, bench, answers=CORRECT):
    for name in BUILDERS:
        for s in load_task(get_task(name), bench):
            stub.answers[prompt_key(s)] = answers[name][s.id]


def backend(stub, **kw):
    kw.setdefault("backoff", 0.01)
    return HTTPBackend(stub.url, "stub-model", **kw)


def test_full_run_scores_canned_answers_in_every_mode(stub, bench, tmp_path, capsys):
    teach(stub, bench)
    out = tmp_path / "run"
    assert main(["eval", "run", "--endpoint", stub.url, "--served-model", "stub-model", "--tasks", ",".join(BUILDERS),
                 "--modes", "auto,think,nothink", "--data-dir", str(bench), "--out", str(out), "--concurrency", "3",
                 "--max-new-tokens", "64"]) == 0
    efforts = {b.get("reasoning_effort", "omitted") for b in stub.bodies}
    assert efforts == {"high", "none", "omitted"}
    assert all(b["temperature"] == 0 and b["max_tokens"] in (4, 64) and b["model"] == "stub-model" for b in stub.bodies)
    for name in BUILDERS:
        for mode in ("auto", "think", "nothink"):
            recs = read_records(records_path(out, name, mode))
            assert set(recs) == set(CORRECT[name])
            for r in recs.values():
                # the reasoning names wrong letters, numbers and boxes: only the answer part is scored
                assert (r["score"], r["parse"]) == (1.0, "ok"), (name, mode, r["id"], r["answer"])
                assert r["answer"] == CORRECT[name][r["id"]].split("</think>")[-1].strip()
                t = r["times"]
                assert t["ttft"] == pytest.approx(t["preprocess"] + t["prefill"], abs=1e-9)
                assert t["total"] == pytest.approx(t["ttft"] + t["decode"], abs=1e-9) and t["decode"] >= 0
                tok = r["tokens"]
                assert tok["prompt"] == 100 and tok["output"] == tok["thinking"] + tok["answer"]
                if mode == "think":
                    assert r["thinking"].startswith(THINKING) and r["answered_mode"] == "think" and tok["thinking"] > 0
                if mode == "nothink":  # (a few canned answers carry their own inline <think>)
                    inline = "</think>" in CORRECT[name][r["id"]]
                    assert r["answered_mode"] == ("think" if inline else "nothink") and tok["thinking"] == 0
    printed = capsys.readouterr().out
    assert "| stub-model | chartqa | think | official | 4 | 100.0 | 0 | 0 | 0 |" in printed


def test_same_prompts_as_the_local_backend(stub, bench, tok_dir):
    """What the server receives renders, with the release-style template, to the exact token ids
    the in-process backend encodes for the same sample (images at the same places, same bytes)."""
    from phi4rv.processing.chat import DEFAULT_CHAT_TEMPLATE, encode_chat
    from phi4rv.processing.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(tok_dir)
    samples = [s for name in ("mmmu", "chartqa", "screenspot_v2") for s in load_task(get_task(name), bench)]
    be = backend(stub, warmup=False)
    list(be.generate([Query(s.messages, s.images, "auto", 8) for s in samples]))
    assert len(stub.bodies) == len(samples)
    by_text = {prompt_key(s): s for s in samples}
    for body in stub.bodies:
        parts = body["messages"][-1]["content"]
        s = by_text["".join(p["text"] for p in parts if p["type"] == "text")]
        sent = encode_chat(tokenizer, body["messages"], mode="auto", template=DEFAULT_CHAT_TEMPLATE)
        local = encode_chat(tokenizer, s.messages, mode="auto", template=DEFAULT_CHAT_TEMPLATE)
        assert sent.input_ids == local.input_ids and sent.num_images == len(s.images)
        urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        sent_bytes = [base64.b64decode(u.split(",", 1)[1]) for u in urls]
        want = [im if isinstance(im, bytes) else open(im, "rb").read() for im in s.images]
        assert sent_bytes == want and all(u.startswith("data:image/png;base64,") for u in urls)


def test_inline_think_is_stripped_from_the_content(stub, bench, tmp_path):
    teach(stub, bench)
    stub.style = "inline"
    cfg = RunConfig(out=tmp_path / "run", tasks=[get_task("ai2d")], modes=["auto", "think"], data_dir=bench)
    run_eval(cfg, backend(stub))
    for mode in ("auto", "think"):
        for r in read_records(records_path(cfg.out, "ai2d", mode)).values():
            assert r["output"].startswith("<think>") and r["thinking"] == THINKING
            assert r["answered_mode"] == "think" and r["score"] == 1.0


def test_5xx_is_retried(stub, bench, tmp_path):
    teach(stub, bench)
    stub.script = ["500", "503"]
    cfg = RunConfig(out=tmp_path / "run", tasks=[get_task("ai2d")], modes=["nothink"], data_dir=bench)
    run_eval(cfg, backend(stub, warmup=False, concurrency=1))
    recs = read_records(records_path(cfg.out, "ai2d", "nothink"))
    assert [r["attempts"] for r in recs.values()] == [3, 1]
    assert all(r["score"] == 1.0 and r["error"] is None for r in recs.values())


def test_timeout_is_retried(stub, bench, tmp_path):
    teach(stub, bench)
    stub.script = ["sleep:2"]
    cfg = RunConfig(out=tmp_path / "run", tasks=[get_task("ai2d")], modes=["nothink"], data_dir=bench)
    run_eval(cfg, backend(stub, warmup=False, timeout=0.5))
    recs = list(read_records(records_path(cfg.out, "ai2d", "nothink")).values())
    assert recs[0]["attempts"] == 2 and recs[0]["score"] == 1.0
    assert recs[0]["times"]["total"] < 1.5  # only the successful attempt is timed


def test_exhausted_retries_are_error_records_that_a_rerun_retries(stub, bench, tmp_path):
    teach(stub, bench)
    stub.script = ["500", "500", "400"]  # sample 0: two 5xx (retries=1) -> error; sample 1: a 400 is not retried
    cfg = RunConfig(out=tmp_path / "run", tasks=[get_task("ai2d")], modes=["nothink"], data_dir=bench)
    with pytest.raises(ValueError, match="2 errors in a row"):  # every query failed: the run stops
        run_eval(cfg, backend(stub, warmup=False, retries=1))
    path = records_path(cfg.out, "ai2d", "nothink")
    recs = read_records(path)
    assert [r["parse"] for r in recs.values()] == ["error", "error"]
    assert "HTTP 500" in recs["0"]["error"] and "gave up after 2 attempts" in recs["0"]["error"]
    assert recs["1"]["error"].startswith("HTTP 400") and recs["1"]["attempts"] == 1
    run_eval(cfg, backend(stub, warmup=False, retries=1))
    recs = read_records(path)
    assert [r["score"] for r in recs.values()] == [1.0, 1.0] and len(path.read_text().splitlines()) == 4


def test_dead_endpoint_stops_the_run_with_one_line(bench, tmp_path, capsys):
    server = Stub()
    url = server.url
    server.server_close()  # nothing listens there any more
    rc = main(["eval", "run", "--endpoint", url, "--served-model", "m", "--tasks", "synthetic", "--modes", "nothink",
               "--data-dir", str(bench), "--out", str(tmp_path / "run"), "--retries", "0", "--no-warmup"])
    err = capsys.readouterr().err
    assert rc == 1 and "errors in a row" in err and "connection error" in err


def test_concurrent_requests_keep_answers_with_their_samples(stub, bench, tmp_path):
    teach(stub, bench)
    stub.delay = 0.2
    cfg = RunConfig(out=tmp_path / "run", tasks=[get_task("screenspot_v2")], modes=["nothink"], data_dir=bench)
    run_eval(cfg, backend(stub, warmup=False, concurrency=3))
    assert stub.max_in_flight >= 2
    recs = read_records(records_path(cfg.out, "screenspot_v2", "nothink"))
    assert len(recs) == 6 and all(r["score"] == 1.0 for r in recs.values())


def test_non_streaming_has_no_ttft_but_a_total(stub, bench, tmp_path):
    teach(stub, bench)
    cfg = RunConfig(out=tmp_path / "run", tasks=[get_task("ai2d")], modes=["think"], data_dir=bench)
    run_eval(cfg, backend(stub, stream=False))
    for r in read_records(records_path(cfg.out, "ai2d", "think")).values():
        assert r["times"]["ttft"] is None and r["times"]["total"] > 0
        assert r["thinking"] == THINKING and r["score"] == 1.0


def test_judge_extracts_only_when_the_extractor_finds_nothing(stub, bench, tmp_path):
    from phi4rv.eval.judge import LLMJudge

    task = get_task("mathvista", judge=LLMJudge(stub.url, "judge"), judge_name="judge")
    samples = {s.id: s for s in load_task(task, bench)}
    stub.answers = {}  # the judge gets a prompt it has no canned answer for: "no idea" -> still unparsed
    assert not task.score(samples["2"], "a thousand people").parsed
    from phi4rv.eval.judge import PROMPT

    stub.answers[PROMPT.format(question="How many people attended?", response="a thousand people")] = "1000"
    scored = task.score(samples["2"], "a thousand people")
    assert scored.judged and scored.score == 1.0
    n = len(stub.bodies)
    assert task.score(samples["2"], "1000").score == 1.0 and len(stub.bodies) == n  # parsed: judge not called


def test_phi4rv_serve_gives_the_records_of_the_in_process_backend(tiny_ckpt, bench, tmp_path):
    """The real server (`phi4rv serve`, batch 1) and the in-process backend, same task and seed:
    the same prompts give the same greedy answers, parse statuses and token counts."""
    import os
    import socket
    import subprocess
    import sys

    import httpx

    from phi4rv.eval.backends import LocalBackend

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "phi4rv", "serve", "--model", str(tiny_ckpt), "--port", str(port),
                             "--served-model-name", "tiny", "--max-batch", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        def cfg(name):
            return RunConfig(out=tmp_path / name, tasks=[get_task("synthetic")], modes=["nothink", "think"],
                             data_dir=bench, limit=3, seed=1, max_new_tokens=6)

        run_eval(cfg("local"), LocalBackend(tiny_ckpt))
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, "phi4rv serve exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.time() < deadline, "phi4rv serve did not start"
                time.sleep(0.2)
        run_eval(cfg("served"), HTTPBackend(f"http://127.0.0.1:{port}/v1", "tiny", timeout=60))
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    for mode in ("nothink", "think"):
        local = read_records(records_path(tmp_path / "local", "synthetic", mode))
        served = read_records(records_path(tmp_path / "served", "synthetic", mode))
        assert list(local) == list(served) and len(local) == 3
        for i in local:
            a, b = local[i], served[i]
            assert (a["answer"], a["parse"], a["answered_mode"]) == (b["answer"], b["parse"], b["answered_mode"]), (mode, i)
            assert a["thinking"] == b["thinking"]
            assert {k: a["tokens"][k] for k in ("prompt", "image", "output", "thinking")} == \
                {k: b["tokens"][k] for k in ("prompt", "image", "output", "thinking")}
