"""Teacher synthesis against a real HTTP server on 127.0.0.1: rejection sampling, retries on 500s
and timeouts, accounting, concurrency limit, and resuming a run."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from phi4rv.data.formats import read_samples, write_parquet
from phi4rv.data.synth import GENERATORS
from phi4rv.data.teacher import TeacherConfig, synthesize


class FakeTeacher:
    """An OpenAI-style /v1/chat/completions server; `script(question, n)` says what to do with the
    n-th request (from 0) for a question: ("answer", text) | ("reasoning", thinking, text) |
    ("status", code) | ("sleep", seconds, text)."""

    def __init__(self, script):
        self.script = script
        self.calls: dict[str, int] = {}
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                question = " ".join(p["text"] for p in user if p["type"] == "text").strip()
                n_images = sum(p["type"] == "image_url" for p in user)
                with outer.lock:
                    n = outer.calls.get(question, 0)
                    outer.calls[question] = n + 1
                    outer.log.append({"question": question, "images": n_images, "path": self.path,
                                      "auth": self.headers.get("Authorization"), "model": body["model"]})
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    action = outer.script(question, n)
                    if action[0] == "sleep":
                        time.sleep(action[1])
                        action = ("answer", action[2])
                finally:
                    # answered from here on: the client may send its next request as soon as it reads
                    # the response, possibly before this thread runs again
                    with outer.lock:
                        outer.in_flight -= 1
                if action[0] == "status":
                    self._send(action[1], {"error": {"message": "boom"}})
                    return
                message = {"role": "assistant", "content": action[-1]}
                if action[0] == "reasoning":
                    message["reasoning_content"] = action[1]
                self._send(200, {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def questions(self) -> list[str]:
        return [entry["question"] for entry in self.log]


def reasoning_samples(n=8):
    tasks = ["chart_sum", "table_total", "geometry_area", "ui_click_effect", "multi_order", "math_expr",
             "receipt_total", "chart_compare"]
    return [GENERATORS[tasks[k % len(tasks)]].generate(1000 + k, "tiny") for k in range(n)]


def question_of(sample) -> str:
    return sample.messages[0]["content"].split("<image>\n")[-1].strip()


def config(url, **kw):
    base = dict(endpoint=url, model="teacher-x", concurrency=4, timeout=3.0, max_retries=2, backoff=0.01,
                attempts=3, temperature=0.7, max_tokens=256)
    return TeacherConfig(**{**base, **kw})


def right(sample):
    return f"<think>\nLooking at the picture step by step for {sample.id}.\n</think>\n\nThe answer is {sample.meta['answer']}."


def wrong(sample):
    bad = {"number": "123456789", "choice": "Z", "order": "9, 8, 7", "text": "nothing", "box": "[0.0, 0.0, 0.01, 0.01]"}
    return f"<think>\nA hasty guess.\n</think>\n\n{bad[sample.meta['answer_type']]}"


def test_rejection_sampling_retries_and_accounting(tmp_path):
    samples = reasoning_samples(7)
    q = {question_of(s): (k, s) for k, s in enumerate(samples)}
    assert len(q) == 7  # distinct questions, so the script can tell samples apart

    def script(question, n):
        k, s = q[question]
        if k == 0:
            return ("answer", right(s))  # right at once
        if k == 1:
            return ("answer", wrong(s) if n == 0 else right(s))  # wrong, then right
        if k == 2:
            return ("answer", wrong(s))  # never right: rejected
        if k == 3:
            return ("status", 500) if n < 2 else ("answer", right(s))  # two 500s, then right
        if k == 4:
            return ("sleep", 10.0, right(s)) if n == 0 else ("answer", right(s))  # times out once
        if k == 5:
            return ("answer", str(s.meta["answer"]) if n == 0 else right(s))  # right but no trace, then a trace
        return ("reasoning", "Reasoning returned apart, as vLLM does.", str(s.meta["answer"]))

    out = tmp_path / "traces.jsonl"
    with FakeTeacher(script) as server:
        summary = synthesize(samples, config(server.url, api_key="sk-test"), out, progress=False)
        log = server.log
    assert summary["accepted"] == 6 and summary["rejected"] == 1 and summary["failed"] == 0
    assert summary["attempts_to_accept"] == {"1": 4, "2": 2}
    assert summary["errors"] == {"http_500": 2, "timeout": 1}
    assert summary["retries"] == 3
    # requests: 1 + 2 + 3 + (2 failed + 1) + (1 timed out + 1) + 2 + 1
    assert summary["requests"] == len(log) == 14
    answered = 14 - 3
    assert summary["tokens"] == {"prompt": 100 * answered, "completion": 20 * answered, "total": 120 * answered}
    assert all(e["auth"] == "Bearer sk-test" and e["model"] == "teacher-x" and e["path"] == "/v1/chat/completions" for e in log)
    assert {e["images"] for e in log} <= {1, 2, 3, 4, 5} and all(e["images"] >= 1 for e in log)

    accepted = {s.id: s for s in read_samples(out)}
    assert set(accepted) == {samples[k].id for k in (0, 1, 3, 4, 5, 6)}
    for k in (0, 1, 3, 4, 5, 6):
        orig, got = samples[k], accepted[samples[k].id]
        a = got.messages[-1]["content"]
        assert a.startswith("<think>\n") and a.endswith(f"</think>\n\n{orig.meta['answer']}")
        assert got.images == orig.images and got.messages[0]["content"] == orig.messages[0]["content"]
        assert got.meta["task"] == orig.meta["task"] and got.meta["teacher"]["model"] == "teacher-x"
    assert "Reasoning returned apart" in accepted[samples[6].id].messages[-1]["content"]
    rejected = [json.loads(line) for line in (tmp_path / "traces.rejected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejected] == [samples[2].id] and len(rejected[0]["tries"]) == 3
    assert json.loads((tmp_path / "traces.summary.json").read_text())["accepted"] == 6


def test_nothing_lost_and_rerun_resumes(tmp_path):
    samples = reasoning_samples(8)
    q = {question_of(s): s for s in samples}
    down = {question_of(s) for s in samples[4:]}

    def flaky(question, n):  # half the samples hit a server that keeps failing
        return ("status", 503) if question in down else ("answer", right(q[question]))

    out = tmp_path / "t.jsonl"
    with FakeTeacher(flaky) as server:
        first = synthesize(samples, config(server.url, max_retries=1), out, progress=False)
    assert first["accepted"] == 4 and first["failed"] == 4 and first["errors"] == {"http_503": 8}
    assert sorted(f["id"] for f in first["failed_ids"]) == sorted(s.id for s in samples[4:])
    # a crash mid-write leaves a torn line; the rerun ignores it and redoes that sample
    with open(out, "a") as f:
        f.write('{"id": "' + samples[5].id + '", "messa')

    with FakeTeacher(lambda question, n: ("answer", right(q[question]))) as server:
        second = synthesize(samples, config(server.url), out, progress=False)
        asked = server.questions()
    assert second["skipped_done"] == 4 and second["accepted"] == 4 and second["failed"] == 0
    assert sorted(asked) == sorted(question_of(s) for s in samples[4:])  # done ones are not asked again
    ids = [s.id for s in read_samples(out)]
    assert sorted(ids) == sorted(s.id for s in samples)  # nothing lost, nothing twice

    with FakeTeacher(lambda question, n: pytest.fail("nothing left to ask")) as server:
        third = synthesize(samples, config(server.url), out, progress=False)
    assert third["skipped_done"] == 8 and third["requests"] == 0 and third["total_recorded"] == 8


def test_concurrency_limit(tmp_path):
    samples = reasoning_samples(8)
    q = {question_of(s): s for s in samples}
    with FakeTeacher(lambda question, n: ("sleep", 0.15, right(q[question]))) as server:
        summary = synthesize(samples, config(server.url, concurrency=3, timeout=5), tmp_path / "c.jsonl", progress=False)
        peak = server.max_in_flight
    assert summary["accepted"] == 8
    assert 2 <= peak <= 3


def test_client_errors_are_not_retried(tmp_path):
    samples = reasoning_samples(2)
    with FakeTeacher(lambda question, n: ("status", 400)) as server:
        summary = synthesize(samples, config(server.url), tmp_path / "e.jsonl", progress=False)
    assert summary["failed"] == 2 and summary["requests"] == 2 and summary["retries"] == 0


def test_cli_teacher(tmp_path, capsys):
    from phi4rv.cli import main

    samples = reasoning_samples(3)
    write_parquet(samples, tmp_path / "in.parquet")
    q = {question_of(s): s for s in samples}
    with FakeTeacher(lambda question, n: ("answer", right(q[question]))) as server:
        rc = main(["data", "teacher", str(tmp_path / "in.parquet"), "--endpoint", server.url, "--model", "m",
                   "--out", str(tmp_path / "out.jsonl"), "--concurrency", "2", "--timeout", "5"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["accepted"] == 3
    assert len(list(read_samples(tmp_path / "out.jsonl"))) == 3
    assert main(["data", "teacher", str(tmp_path / "in.parquet"), "--endpoint", "ftp://x", "--model", "m",
                 "--out", str(tmp_path / "o2.jsonl")]) == 1


def test_vote_regenerates_answers_without_ground_truth(tmp_path):
    from dataclasses import replace

    samples = reasoning_samples(3)
    # the datasets' answers are wrong and not to be trusted: no meta answer, a bad assistant turn
    broken = [replace(s, messages=[s.messages[0], {"role": "assistant", "content": "???"}],
                      meta={k: v for k, v in s.meta.items() if k != "answer"}) for s in samples]
    q = {question_of(s): (k, s) for k, s in enumerate(samples)}

    def script(question, n):
        k, s = q[question]
        if k == 0:  # 2 of 3 traces agree on the right answer
            return ("answer", right(s) if n != 1 else wrong(s))
        if k == 1:  # every trace says something else: no majority
            return ("answer", f"<think>\nguess {n}\n</think>\n\n{['1, 2, 3', 'A', '[0.5, 0.5, 0.6, 0.6]'][n]}")
        return ("answer", right(s))

    with FakeTeacher(script) as server:
        summary = synthesize(broken, config(server.url, vote=3), tmp_path / "v.jsonl", progress=False)
    assert summary["accepted"] == 2 and summary["rejected"] == 1 and summary["requests"] == 9
    got = {s.id: s for s in read_samples(tmp_path / "v.jsonl")}
    for k in (0, 2):
        s = got[samples[k].id]
        assert s.meta["regenerated"] and s.meta["answer"] == samples[k].meta["answer"]  # in its canonical form
        assert s.messages[-1]["content"].endswith(f"</think>\n\n{samples[k].meta['answer']}")
