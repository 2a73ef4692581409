"""The benchmarks run end to end on tiny sizes and report their figures (never how fast they are)."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, tmp_path: Path) -> tuple[str, dict]:
    out = tmp_path / f"{script}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), "--tiny", "--device", "cpu", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads(out.read_text())


def check_machine(info: dict) -> None:
    for key in ("cpu", "cores", "torch", "threads", "dtype", "device"):
        assert key in info


def test_vision_packing_reports_its_figures(tmp_path):
    stdout, fig = run_bench("vision_packing", tmp_path)
    check_machine(fig["machine"])
    for side in ("ours", "transformers", "transformers_last_layer_removed"):
        r = fig["results"][side]
        assert r["median_s"] > 0 and r["best_s"] > 0 and len(r["warmup_s"]) >= 1
    assert fig["ratio"] > 0 and fig["ratio_packing_only"] > 0 and fig["work_ratio"] > 1
    assert fig["patches"]["packed"] < fig["patches"]["padded"]
    assert fig["max_abs_diff"] < 1e-4  # the two sides compute the same features
    assert "speed-up" in stdout and "max |ours - transformers|" in stdout


def test_decode_reports_its_figures(tmp_path):
    stdout, fig = run_bench("decode", tmp_path)
    check_machine(fig["machine"])
    assert [r["batch"] for r in fig["results"]] == [1, 2]
    for r in fig["results"]:
        for side in ("ours", "transformers"):
            s = r[side]
            assert s["decode_tokens_per_s"] > 0 and s["prefill_median_s"] > 0 and len(s["warmup_s"]) >= 1
        assert r["ratio"] > 0
        assert r["lengths"] == [r["new_tokens"]]  # both sides made exactly new_tokens tokens
        assert r["tokens_identical"]
    assert fig["bandwidth_bytes_per_s"] > 0 and fig["weight_bytes_per_token"] > 0
    assert 0 < fig["roofline_fraction"]
    assert "tokens/s" in stdout and "roofline" in stdout
