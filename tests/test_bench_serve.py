import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "serve_load.py"


def test_serve_load_benchmark_runs_tiny(tiny_ckpt, tmp_path):
    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, str(BENCH), "--tiny", "--model", str(tiny_ckpt), "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "throughput ratio" in r.stdout
    figures = json.loads(out.read_text())
    for run in ("continuous", "one-at-a-time"):
        assert figures[run]["completed"] == figures[run]["requests"] and figures[run]["failed"] == 0
        assert figures[run]["tokens_per_s"] > 0 and figures[run]["ttft_p50_s"] > 0
