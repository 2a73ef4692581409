"""The `phi4rv` command end to end: init, info, chat, and one-line errors with a non-zero exit."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from phi4rv.cli import main
from phi4rv.generation.cache import PREFILL_BYTES


def run(*args, stdin=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "phi4rv", *map(str, args)], capture_output=True, text=True,
                          env=env, input=stdin, timeout=120)


def test_init_info_chat_json(tmp_path, images_dir):
    out = tmp_path / "tiny"
    r = run("init", "--preset", "tiny", "--out", out, "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert (out / "chat_template.jinja").is_file() and (out / "tokenizer.json").is_file()
    info = run("info", out, "--json")
    assert json.loads(info.stdout)["parameters"]["total"] > 1e6
    r = run("chat", "--model", out, "--image", images_dir / "photo.jpg", "--temperature", "0",
            "--max-new-tokens", "5", "--json", "--top-logprobs", "2", "Describe.")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert {"thinking", "answer", "mode", "token_ids", "logprobs", "usage", "timing"} <= set(obj)
    assert len(obj["token_ids"]) == len(obj["logprobs"]) == 5
    assert obj["usage"]["image_tokens"] > 0
    assert set(obj["timing"]) == {"preprocess", "vision", "prefill", "decode"}


def test_chat_greedy_is_reproducible_and_streams(tiny_ckpt, capsys):
    args = ["chat", "--model", str(tiny_ckpt), "--temperature", "0", "--max-new-tokens", "8", "--json", "Hello"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == first["token_ids"]
    assert main(args[:-2] + ["--mode", "think", "Hello"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.startswith("[thinking]")


def test_interactive_session_keeps_history(tiny_ckpt):
    r = run("chat", "--model", tiny_ckpt, "--temperature", "0", "--max-new-tokens", "3", "--json", stdin="hi\nagain\n\n")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 2 and lines[1]["usage"]["prompt_tokens"] > lines[0]["usage"]["prompt_tokens"] + 3


def error_of(args, capsys):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("phi4rv: error:") and "\n" not in err
    return err


def test_bad_input_gets_one_line_errors(tiny_ckpt, tmp_path, capsys):
    assert "not found" in error_of(["chat", "--model", tmp_path / "missing", "hi"], capsys)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert "not an image" in error_of(["chat", "--model", tiny_ckpt, "--image", text, "hi"], capsys)
    err = error_of(["chat", "--model", tiny_ckpt, "<image><image> two?"], capsys)
    assert "2 <image> tag(s) but 0 image(s)" in err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    for shard in broken.glob("model-*.safetensors"):
        shard.write_bytes(shard.read_bytes()[:1000])
    assert "safetensors" in error_of(["chat", "--model", broken, "hi"], capsys)
    for shard in broken.glob("model-*.safetensors"):
        shard.unlink()
    assert "missing weight files" in error_of(["chat", "--model", broken, "hi"], capsys)
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    shaped = tmp_path / "shaped"
    shutil.copytree(tiny_ckpt, shaped)
    (shaped / "config.json").write_text(json.dumps({**cfg, "hidden_size": 96}))
    assert "shape" in error_of(["chat", "--model", shaped, "hi"], capsys)
    assert "temperature" in error_of(["chat", "--model", tiny_ckpt, "--temperature", "-1", "hi"], capsys)


def test_the_command_asks_torch_for_huge_pages_unless_told_otherwise():
    probe = "import phi4rv.cli, os; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "1"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**env, "THP_MEM_ALLOC_ENABLE": "0"}, check=True)
    assert out.stdout.strip() == "0"  # a user's own setting wins


def test_a_kv_cache_that_cannot_fit_is_refused_with_what_would(tiny_ckpt, monkeypatch, capsys):
    """serve sizes 8 slots x the model's context by default: on a machine without the memory for
    them it serves as many as fit; a --max-batch asked for is refused with the --max-batch or
    --max-context that fits (checked: that one then starts)."""
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    per_position = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"]) * 4
    caches = 2 * 256 * 2**20  # the prefix and image caches may grow to their defaults, 256 MiB each
    budget = PREFILL_BYTES + caches + 3 * 4097 * per_position + 100  # fp32: room for 3 slots of the tiny model's 4096 positions
    monkeypatch.setattr("phi4rv.generation.cache.available_memory", lambda device: budget)
    ran = []
    monkeypatch.setattr("phi4rv.serve.app.run", lambda app, host, port, level: ran.append(
        (len(app.state.engine.core.cache.lengths), app.state.engine.slot_len)))
    err = error_of(["serve", "--model", tiny_ckpt, "--max-batch", "8", "--dtype", "float32"], capsys)
    assert "KV cache" in err and "--max-batch 3 or --max-context 1535 would fit" in err, err
    serve = ["serve", "--model", str(tiny_ckpt), "--dtype", "float32"]
    assert main([*serve, "--max-batch", "3"]) == 0
    assert main([*serve, "--max-batch", "8", "--max-context", "1535"]) == 0
    assert main(serve) == 0
    assert main([*serve, "--max-batch", "8", "--prefix-cache-mb", "0", "--image-cache-mb", "0"]) == 0  # their room is free
    assert ran == [(3, 4096), (8, 1535), (3, 4096), (8, 4096)]
    assert "serving 3 at once" in capsys.readouterr().err
    assert "context of 5000 positions" in error_of(["serve", "--model", tiny_ckpt, "--max-context", "5000"], capsys)


def test_serve_refuses_a_kv_cache_before_reading_the_weights(tiny_ckpt, monkeypatch, capsys):
    """On the 15B the load takes minutes: a --max-batch or --max-context that cannot fit beside the
    weights is refused from the estimate, before any tensor is read."""
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    per_position = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"]) * 4
    weights = 10**9  # what the load is said to take
    monkeypatch.setattr("phi4rv.checkpoint.model_bytes", lambda *a: weights)
    caches = 2 * 256 * 2**20  # the prefix and image caches' defaults
    monkeypatch.setattr("phi4rv.checkpoint.available_memory", lambda device: weights + PREFILL_BYTES + caches + 3 * 4097 * per_position + 100)

    def read(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr("phi4rv.checkpoint.read_tensor", read)
    monkeypatch.setattr("phi4rv.checkpoint.StoredRows", read)
    err = error_of(["serve", "--model", tiny_ckpt, "--max-batch", "8", "--dtype", "float32"], capsys)
    assert "KV cache" in err and "--max-batch 3 or --max-context 1535 would fit" in err, err
    assert "context of 5000 positions" in error_of(["serve", "--model", tiny_ckpt, "--max-context", "5000"], capsys)
    with pytest.raises(AssertionError, match="a weight was read"):  # 3 fit: the load goes on
        main(["serve", "--model", str(tiny_ckpt), "--max-batch", "3", "--dtype", "float32"])
