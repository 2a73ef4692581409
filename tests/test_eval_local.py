"""`phi4rv eval run --model`: the in-process backend on the tiny random checkpoint — records,
resume, fixed subsets, timing and token accounting. (The model is noise: these tests check the
plumbing; scoring correctness is covered with canned outputs in test_eval_data / test_eval_http.)"""

import json

import pytest
from test_eval_data import build_ai2d, build_synthetic, png

import phi4rv.generation.generate as gen_module
from phi4rv.cli import main
from phi4rv.eval.backends import LocalBackend, Query
from phi4rv.eval.records import read_records, records_path
from phi4rv.eval.runner import select
from phi4rv.eval.tasks import EvalSample

MAX_NEW = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("local_bench")
    build_ai2d(root)
    build_synthetic(root)
    return root


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def run_cli(tiny_ckpt, data, out, *extra):
    args = ["eval", "run", "--model", str(tiny_ckpt), "--data-dir", str(data), "--out", str(out),
            "--max-new-tokens", str(MAX_NEW), *extra]
    assert main(args) == 0


@pytest.fixture(scope="module")
def run_dir(tiny_ckpt, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    run_cli(tiny_ckpt, data, out, "--tasks", "ai2d,synthetic", "--modes", "auto,think,nothink")
    return out


def test_one_record_per_sample_and_mode(run_dir):
    for task, n in (("ai2d", 2), ("synthetic", 6)):
        for mode in ("auto", "think", "nothink"):
            recs = lines(records_path(run_dir, task, mode))
            assert len(recs) == n and len({r["id"] for r in recs}) == n
            for r in recs:
                assert {"id", "prompt", "output", "thinking", "answer", "parse", "score", "tokens", "times"} <= set(r)
                assert r["mode"] == mode and r["task"] == task and r["parse"] in ("ok", "unparsed", "no_answer")
                assert r["prompt"][-1]["role"] == "user" and r["n_images"] == 1
    run = json.loads((run_dir / "run.json").read_text())
    assert run["backend"]["kind"] == "local" and run["settings"]["max_new_tokens"] == MAX_NEW
    assert run["tasks"]["ai2d"] == {"version": "2", "rules": "official"} and run["samples"]["ai2d"] == 2
    assert run["modes"] == ["auto", "think", "nothink"]


def test_times_add_up_and_tokens_are_counted(run_dir):
    for mode in ("auto", "think", "nothink"):
        for r in lines(records_path(run_dir, "synthetic", mode)):
            t, k = r["times"], r["tokens"]
            assert all(t[x] >= 0 for x in ("preprocess", "vision", "prefill", "decode"))
            assert t["ttft"] == pytest.approx(t["preprocess"] + t["vision"] + t["prefill"], abs=1e-9)
            assert t["total"] == pytest.approx(t["ttft"] + t["decode"], abs=1e-9)
            assert t["total"] > t["ttft"] > 0
            assert 1 <= k["output"] <= MAX_NEW and k["output"] == k["thinking"] + k["answer"]
            assert k["image"] > 0 and k["prompt"] > k["image"]
            if mode == "think":
                # the prompt opened <think>: every token is reasoning until </think>, which noise never writes
                assert k["thinking"] == k["output"] and r["answered_mode"] == "think" and r["parse"] == "no_answer"
            if mode == "nothink":
                assert k["thinking"] == 0 and r["answered_mode"] == "nothink"


def test_rerun_resumes_and_retries_errors(run_dir, tiny_ckpt, data):
    path = records_path(run_dir, "synthetic", "nothink")
    recs = lines(path)
    kept = recs[:4] + [{**recs[4], "parse": "error", "error": "boom"}]  # syn-5 missing, syn-4 errored
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    other = records_path(run_dir, "ai2d", "auto").read_text()
    run_cli(tiny_ckpt, data, run_dir, "--tasks", "ai2d,synthetic", "--modes", "auto,think,nothink")
    after = lines(path)
    assert [r["id"] for r in after[:5]] == [r["id"] for r in kept]  # nothing done was redone
    assert sorted(r["id"] for r in after[5:]) == ["syn-4", "syn-5"]
    assert read_records(path)["syn-4"]["parse"] != "error"  # the retry's line wins
    assert records_path(run_dir, "ai2d", "auto").read_text() == other
    # greedy: the redone samples give what they gave the first time
    assert {r["id"]: r["output"] for r in after[5:]} == {r["id"]: r["output"] for r in recs[4:]}


def test_resume_refuses_different_settings(run_dir, tiny_ckpt, data, capsys):
    args = ["eval", "run", "--model", str(tiny_ckpt), "--data-dir", str(data), "--out", str(run_dir),
            "--tasks", "ai2d", "--max-new-tokens", str(MAX_NEW + 1)]
    assert main(args) == 1
    assert "different settings" in capsys.readouterr().err


def test_limit_and_seed_pick_a_fixed_subset(tiny_ckpt, data, tmp_path):
    run_cli(tiny_ckpt, data, tmp_path / "a", "--tasks", "synthetic", "--modes", "nothink", "--limit", "3", "--seed", "7")
    run_cli(tiny_ckpt, data, tmp_path / "b", "--tasks", "synthetic", "--modes", "nothink", "--limit", "3", "--seed", "7",
            "--no-warmup")
    a = [r["id"] for r in lines(records_path(tmp_path / "a", "synthetic", "nothink"))]
    b = [r["id"] for r in lines(records_path(tmp_path / "b", "synthetic", "nothink"))]
    assert len(a) == 3 and a == b
    samples = [EvalSample(str(i), [], [], None) for i in range(100)]
    picked = [s.id for s in select(samples, 10, seed=1)]
    assert picked == [s.id for s in select(samples, 10, seed=1)]
    assert picked != [s.id for s in select(samples, 10, seed=2)]
    assert [int(x) for x in picked] == sorted(int(x) for x in picked)  # dataset order kept


def test_warm_up_runs_once_and_is_not_recorded(tiny_ckpt, monkeypatch):
    calls = []
    real = gen_module.generate_stream

    def spy(model, tok, requests, params, timing=None):
        calls.append(params.max_new_tokens)
        yield from real(model, tok, requests, params, timing)

    monkeypatch.setattr(gen_module, "generate_stream", spy)
    backend = LocalBackend(tiny_ckpt)
    q = Query([{"role": "user", "content": "<image>\nWhat is it?"}], [png()], "nothink", 5)
    out = list(backend.generate([q, q]))
    assert [i for i, _ in out] == [0, 1] and calls == [4, 5, 5]  # one short warm-up, then each query
    calls.clear()
    list(backend.generate([q]))
    assert calls == [5]  # warm once per backend


def test_batched_matches_single(tiny_ckpt):
    qs = [Query([{"role": "user", "content": f"<image>\nQuestion {i}?"}], [png(32 + 16 * i, 48)], "auto", 5)
          for i in range(3)]
    single = dict(LocalBackend(tiny_ckpt, warmup=False).generate(qs))
    batched = dict(LocalBackend(tiny_ckpt, batch_size=3, warmup=False).generate(qs))
    assert [single[i].output for i in range(3)] == [batched[i].output for i in range(3)]
    assert [single[i].tokens for i in range(3)] == [batched[i].tokens for i in range(3)]


def test_bad_image_is_an_error_record_not_a_crash(tiny_ckpt):
    qs = [Query([{"role": "user", "content": "<image>\nHi"}], [b"not an image"], "auto", 3),
          Query([{"role": "user", "content": "<image>\nHi"}], [png()], "auto", 3)]
    replies = dict(LocalBackend(tiny_ckpt, batch_size=2, warmup=False).generate(qs))
    assert replies[0].error and "image" in replies[0].error.lower()
    assert replies[1].error is None and replies[1].tokens["output"] >= 1
