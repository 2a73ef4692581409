"""Every benchmark runs end to end on tiny sizes; its headline figures must be what its own timings
give (recomputed here), each side timed >= 3 times, and the machine's rates measured beside them.
Never how fast anything is."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, tmp_path: Path, *extra: str) -> tuple[str, dict]:
    out = tmp_path / f"{script}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), "--tiny", "--device", "cpu", "--json", str(out), *extra],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads(out.read_text())


def check_machine(fig: dict) -> None:
    for key in ("cpu", "cores", "torch", "threads", "dtype", "device"):
        assert key in fig["machine"]
    rates = fig["machine_rates"]
    assert rates["copy_bandwidth_bytes_per_s"] == pytest.approx(2 * rates["read_bandwidth_bytes_per_s"])


def test_vision_packing_headline_is_at_the_release_depth(tmp_path):
    stdout, fig = run_bench("vision_packing", tmp_path)
    check_machine(fig)
    res = fig["results"]
    for side in ("ours", "transformers", "transformers_last_layer_removed"):
        assert len(res[side]["times_s"]) >= 3 and res[side]["median_s"] == statistics.median(res[side]["times_s"])
        assert res[side]["best_s"] == min(res[side]["times_s"])
    per_layer = res["transformers_last_layer_removed"]["median_s"] / res["ours"]["median_s"]
    assert fig["ratio_per_layer"] == pytest.approx(per_layer)
    assert fig["ratio_real_depth"] == pytest.approx(per_layer * 27 / 26)  # 27 layers against our 26
    assert fig["ratio"] == pytest.approx(res["transformers"]["median_s"] / res["ours"]["median_s"])
    assert fig["meets_target"] == (fig["ratio_real_depth"] >= fig["target_ratio"])
    assert fig["patches"]["packed"] < fig["patches"]["padded"]
    assert fig["max_abs_diff"] < 1e-4  # the two sides compute the same features
    assert "speed-up at the release's 27 layers" in stdout and "not a real-depth figure" in stdout


def test_decode_ratio_and_roofline_come_from_the_timings(tmp_path):
    stdout, fig = run_bench("decode", tmp_path)
    check_machine(fig)
    assert [r["batch"] for r in fig["results"]] == [1, 2]
    for r in fig["results"]:
        for side in ("ours", "transformers"):
            s = r[side]
            assert len(s["decode_s"]) >= 3
            assert s["decode_tokens_per_s"] == pytest.approx(r["batch"] * (r["new_tokens"] - 1) / statistics.median(s["decode_s"]))
        assert r["ratio"] == pytest.approx(r["ours"]["decode_tokens_per_s"] / r["transformers"]["decode_tokens_per_s"])
        assert r["lengths"] == [r["new_tokens"]]  # both sides made exactly new_tokens tokens
        assert r["tokens_identical"]
    assert fig["bandwidth_bytes_per_s"] == max(fig["bandwidth_bytes_per_s_before_after"])
    b1 = fig["results"][0]["ours"]["decode_tokens_per_s"]
    assert fig["roofline_fraction"] == pytest.approx(b1 * fig["weight_bytes_per_token"] / fig["bandwidth_bytes_per_s"])
    assert "copy kernel" in stdout and "roofline" in stdout


def test_train_packing_compares_with_length_grouped_padding(tmp_path):
    stdout, fig = run_bench("train_packing", tmp_path, "--sides", "packed;padded;padded, length-grouped")
    check_machine(fig)
    res = fig["results"]
    assert set(res) == {"packed", "padded", "padded, length-grouped"}
    for side, r in res.items():
        assert len(r["tokens_per_s_runs"]) == 3 and r["tokens_per_s"] == statistics.median(r["tokens_per_s_runs"])
        assert r["fill"] == pytest.approx(r["real_tokens"] / r["token_slots"])
    # grouping by length pads less than dataset order; packing fills rows better than either
    assert res["padded, length-grouped"]["fill"] > res["padded"]["fill"]
    assert res["packed"]["fill"] > res["padded, length-grouped"]["fill"]
    for side in ("padded", "padded, length-grouped"):
        assert fig["ratios"][f"packed vs {side}"] == pytest.approx(res["packed"]["tokens_per_s"] / res[side]["tokens_per_s"])
    assert "packed vs padded, length-grouped" in stdout


def test_data_throughput_reports_every_generator(tmp_path):
    stdout, fig = run_bench("data_throughput", tmp_path)
    from phi4rv.data.synth import GENERATORS

    assert set(GENERATORS) <= set(fig["generators"])
    for name in GENERATORS:
        g = fig["generators"][name]
        assert g["best_samples_per_s"] >= g["samples_per_s"]
    assert "curation:" in stdout


def test_loss_chunk_reports_its_figures(tmp_path):
    stdout, fig = run_bench("loss_chunk", tmp_path)
    for key in ("cpu", "cores", "torch", "threads", "dtype", "device"):
        assert key in fig["machine"]
    for side in ("full", "chunked"):
        assert fig["timing"][side]["median_s"] > 0 and len(fig["timing"][side]["times_s"]) >= 3
        assert fig["memory"][side]["peak_growth_mib"] >= 0
    full, chunked = fig["memory"]["full"]["loss"], fig["memory"]["chunked"]["loss"]
    assert abs(full - chunked) <= 1e-3 * abs(full)  # bf16 matmuls on both sides: the same loss
    assert "less peak memory" in stdout


def test_linear_backend_ratios_come_from_the_timings(tmp_path):
    _, fig = run_bench("linear_backend", tmp_path, "--rows", "1", "4")
    check_machine(fig)
    assert {(r["shape"], r["rows"]) for r in fig["results"]} == {(s, m) for s in ("tiny lm_head", "small gate_up")
                                                                  for m in (1, 4)}
    for r in fig["results"]:
        slow, fast = r["F.linear"], r["oneDNN"]
        assert len(slow["times_s"]) >= 3 and len(fast["times_s"]) >= 3
        assert r["ratio_median"] == pytest.approx(statistics.median(slow["times_s"]) / statistics.median(fast["times_s"]))
        assert r["ratio_best"] == pytest.approx(min(slow["times_s"]) / min(fast["times_s"]))
        assert 0 < r["err"]["oneDNN"] < 1e-4 and r["err"]["F.linear"] < 1e-4  # both full fp32 products


def test_int8_backend_sides_agree_bitwise_and_ratios_come_from_the_timings(tmp_path):
    _, fig = run_bench("int8_backend", tmp_path, "--rows", "1", "4")
    check_machine(fig)
    assert {(r["shape"], r["rows"]) for r in fig["results"]} == {(s, m) for s in ("tiny lm_head", "tiny gate_up")
                                                                  for m in (1, 4)}
    for r in fig["results"]:
        slow, fast = r["_int_mm"], r["prepacked"]
        assert r["equal"] and len(slow["times_s"]) >= 3 and len(fast["times_s"]) >= 3
        assert r["ratio_median"] == pytest.approx(statistics.median(slow["times_s"]) / statistics.median(fast["times_s"]))
        assert r["ratio_best"] == pytest.approx(min(slow["times_s"]) / min(fast["times_s"]))


def test_structured_ratios_come_from_the_timings(tmp_path):
    _, fig = run_bench("structured", tmp_path, "--new-tokens", "6", "--batch", "1", "--warmup", "0")
    free = sorted(fig["runs"]["free_b1"]["per_token_s"])
    for side in ("free", "schema", "json_object"):
        times = sorted(fig["runs"][f"{side}_b1"]["per_token_s"])
        assert len(times) >= 3 and times[0] > 0
        median = statistics.median(times) / statistics.median(free) - 1
        assert fig["runs"][f"{side}_b1"]["overhead_median"] == pytest.approx(median, rel=1e-9, abs=1e-12)


def test_memory_plan_error_is_plan_over_measured(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, str(BENCH / "memory_plan.py"), "--tiny", "--worlds", "1", "--steps", "1",
                           "--json", str(out)], env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [row] = json.loads(out.read_text())["results"]
    assert row["world"] == 1 and row["measured_gib"] > 0
    assert row["plan_gib"] == pytest.approx(sum(row["plan_parts_gib"].values()), rel=1e-6)
    assert row["error"] == pytest.approx(row["plan_gib"] / row["measured_gib"] - 1, abs=1e-2)


def test_scale_trains_qlora_on_a_checkpoint_and_saves_the_adapters(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(BENCH / "scale.py"), "--tiny", "--steps", "2", "--threads", "1",
                           "--json", str(out)], env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fig = json.loads(out.read_text())
    assert [s["step"] for s in fig["steps"]] == [1, 2] and all(s["perf/step_s"] > 0 for s in fig["steps"])
    assert fig["adapters_bytes"] > 0 and 0 < fig["loop_peak_gib"] <= fig["run_peak_gib"]
    assert fig["decoder_layers"] == 2 and fig["plan_gib"] > 0


def test_big_model_runs_end_to_end_at_the_tiny_preset(tmp_path):
    out = tmp_path / "big.json"
    proc = subprocess.run([sys.executable, str(BENCH / "big_model.py"), "--tiny", "--dir", str(tmp_path / "ckpt"),
                           "--quantize", "int8,int4", "--repeats", "1", "--new-tokens", "4", "--json", str(out)],
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fig = json.loads(out.read_text())
    assert fig["write"]["bytes"] > 0 and fig["write"]["shards"] >= 1
    assert not (tmp_path / "ckpt").exists()  # deleted after unless --keep
    for mode in ("int8", "int4"):
        run = fig["runs"][mode]
        assert 0 < run["decode_bytes"] < run["resident_bytes"]
        text, image = run["prompts"]["text"][0], run["prompts"]["image"][0]
        assert text["image_tokens"] == 0 and image["image_tokens"] > 0
        assert text["new_tokens"] == image["new_tokens"] == 4 and text["decode_tok_s"] > 0
        assert all(b > 0 for b in text["bandwidth_before_after"] + image["bandwidth_before_after"])
    assert fig["runs"]["int4"]["resident_bytes"] < fig["runs"]["int8"]["resident_bytes"]


def test_quant_quality_reference_row_is_exact(tmp_path):
    out = tmp_path / "quant.json"
    proc = subprocess.run([sys.executable, str(BENCH / "quant_quality.py"), "--tiny", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    ref = rows["fp32"]
    assert ref["kl_max"] == 0 and ref["top1_agreement"] == 1 and ref["greedy_identical"] == 1
    sizes = [rows[k]["decoder_bytes"] for k in ("fp32", "bf16", "int8 (bf16 act)", "int4 (bf16 act)")]
    assert sizes == sorted(sizes, reverse=True)
    for row in rows.values():
        assert row["kl_mean"] >= 0 and 0 <= row["top1_agreement"] <= 1


def test_decode_compile_ratios_come_from_the_timings(tmp_path):
    stdout, fig = run_bench("decode_compile", tmp_path, "--quantize", "none")
    assert "compiled / eager decode tok/s" in stdout
    for r in fig["results"]:
        for side in ("eager", "compiled"):
            times = r[side]["decode_s"]
            assert len(times) >= 3 and r[side]["decode_median_s"] == statistics.median(times)
            assert r[side]["decode_tokens_per_s"] == pytest.approx(r["batch"] * 7 / statistics.median(times))
        assert r["ratio_median"] == pytest.approx(r["eager"]["decode_median_s"] / r["compiled"]["decode_median_s"])
        assert r["ratio_min"] == pytest.approx(min(r["eager"]["decode_s"]) / min(r["compiled"]["decode_s"]))
        assert r["graphs_compiled"]["eager"] == 0 and r["graphs_compiled"]["compiled"] >= 1
