import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "serve_load.py"


def test_serve_load_benchmark_alternates_rounds_and_reports_its_ratio(tiny_ckpt, tmp_path):
    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, str(BENCH), "--tiny", "--model", str(tiny_ckpt), "--json", str(out),
                        "--shared-prefix", "60"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "throughput ratio" in r.stdout and "machine rates: copy bandwidth" in r.stdout
    figures = json.loads(out.read_text())
    assert "prefix cache gain" in r.stdout
    for run in ("continuous", "one-at-a-time", "no prefix cache"):
        f = figures[run]
        assert f["completed"] == f["requests"] and f["failed"] == 0 and f["lost"] == 0
        assert len(f["requests_per_s_rounds"]) == figures["repeats"] == 3
        assert f["requests_per_s"] == statistics.median(f["requests_per_s_rounds"])
        assert f["ttft_p50_s"] <= f["latency_p50_s"] and f["ttft_p50_s"] <= f["ttft_p99_s"]
    assert figures["ratio"] == pytest.approx(figures["continuous"]["requests_per_s"] / figures["one-at-a-time"]["requests_per_s"])


def test_serve_soak_runs_briefly_and_loses_nothing(tiny_ckpt, tmp_path):
    out = tmp_path / "soak.json"
    soak = BENCH.with_name("serve_soak.py")
    r = subprocess.run([sys.executable, str(soak), "--model", str(tiny_ckpt), "--minutes", "0.25", "--clients", "3",
                        "--max-tokens", "4", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    figures = json.loads(out.read_text())
    assert figures["lost"] == 0 and figures["5xx"] == 0 and len(figures["rss_samples"]) >= 3
    assert sum(figures["statuses"].values()) > 0 and "server RSS after warm-up" in r.stdout
