"""The training loop: exact resume after SIGKILL or a crash mid-save, checkpoints that load, freezing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from phi4rv.checkpoint import load_model
from phi4rv.cli import main
from phi4rv.train import checkpointing as ckpt_io
from phi4rv.train.config import ConfigError, load_config
from phi4rv.train.loop import run
from phi4rv.train.metrics import read_metrics
from phi4rv.train.toy import toy_config, write_toy

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_toy(tmp_path_factory.mktemp("toy"), n_train=160, n_test=16, seed=0)


def losses(stage_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(stage_dir / "metrics.jsonl") if "train/loss" in r]


def phi4rv(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "phi4rv", *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory) -> Path:
    """An uninterrupted 24-step run, checkpoint every 4 steps."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    cfg = toy_config(run_dir, toy, steps=24)
    cfg["checkpoint"] = {"every": 4, "keep": 10}
    run(load_config(None, base=cfg))
    return run_dir


def test_sigkill_then_resume_reproduces_the_loss_trace(toy, reference, tmp_path, capsys):
    cfg = yaml.safe_load((reference / "config.yaml").read_text())
    cfg["run_dir"] = str(tmp_path / "run")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = phi4rv("train", tmp_path / "c.yaml")
    target = tmp_path / "run" / "toy" / "step-00000008" / "trainer" / "state.json"
    deadline = time.time() + 120
    while not target.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "toy" / "final").exists(), "the run finished before it was killed"
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert "resuming from" in capsys.readouterr().err
    assert losses(tmp_path / "run" / "toy") == losses(reference / "toy")  # exactly, step by step
    assert [s for s, _ in losses(reference / "toy")] == list(range(1, 25))
    a = load_model(tmp_path / "run" / "toy" / "final").state_dict()
    b = load_model(reference / "toy" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def disk_full(*a, **kw):
    raise OSError("disk full")


@pytest.mark.parametrize("at", ["shards", "state"])
def test_crash_while_saving_keeps_the_last_checkpoint(toy, reference, tmp_path, monkeypatch, at):
    cfg = toy_config(tmp_path / "run", toy, steps=24)
    cfg["checkpoint"] = {"every": 4, "keep": 10}
    real = ckpt_io.save_training_checkpoint

    def crash_at_8(stage_dir, step, *a, **kw):
        if step == 8 and at == "shards":  # die while the trainer state's shards are written
            import safetensors.torch  # what torch.distributed.checkpoint's safetensors storage writes with

            monkeypatch.setattr(safetensors.torch, "save", disk_full)
        if step == 8 and at == "state":  # die after everything else is written, before the rename
            orig = ckpt_io._json_write
            monkeypatch.setattr(ckpt_io, "_json_write", lambda p, o: disk_full() if p.name == "state.json" else orig(p, o))
        return real(stage_dir, step, *a, **kw)

    monkeypatch.setattr(ckpt_io, "save_training_checkpoint", crash_at_8)
    with pytest.raises(OSError, match="disk full"):
        run(load_config(None, base=cfg))
    stage = tmp_path / "run" / "toy"
    assert ckpt_io.latest_checkpoint(stage).name == "step-00000004"
    assert list(stage.glob(".step-00000008.partial"))  # the half-written one is only a leftover
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="--resume"):  # a fresh start never clobbers a run
        run(load_config(None, base=cfg))
    run(load_config(None, base=cfg), resume=True)
    assert losses(stage) == losses(reference / "toy")
    assert not list(stage.glob(".*.partial"))


def test_checkpoints_load_for_chat(reference):
    from phi4rv.chat_model import ChatModel
    from phi4rv.generation.sampling import SamplingParams

    stage = reference / "toy"
    for folder in (stage / "step-00000024", stage / "final"):
        model = load_model(folder)
        assert model.cfg.decoder.hidden_size == 32 and model.cfg.decoder.vocab_size == 352
    final, last = load_model(stage / "final").state_dict(), load_model(stage / "step-00000024").state_dict()
    assert all(torch.equal(final[k], last[k]) for k in final)
    cm = ChatModel.load(stage / "final", device="cpu")
    r = cm.chat([{"role": "user", "content": "What is 1+2?"}], params=cm.params(max_new_tokens=4, sampling=SamplingParams(temperature=0)))
    assert r.usage["completion_tokens"] >= 1
    state = json.loads((stage / "step-00000008" / "trainer" / "state.json").read_text())
    assert state["step"] == 8 and state["micro_batch"] == 8 and state["total_steps"] == 24
    config = yaml.safe_load((reference / "config.yaml").read_text())  # the resolved config, every field
    assert config["stages"]["toy"]["schedule"] == "cosine" and config["checkpoint"]["every"] == 4


def test_projector_only_stage_changes_only_the_projector_then_next_stage_continues(toy, tmp_path):
    cfg = toy_config(tmp_path / "run", toy, steps=3)
    align = dict(cfg["stages"]["toy"], train={"projector": 1e-2})
    full = dict(cfg["stages"]["toy"], max_steps=2)
    cfg["stages"] = {"align": align, "full": full}
    cfg["log"] = {"progress": False, "plot": True, "tensorboard": True}
    cfg["eval"] = {"datasets": [{"path": str(toy / "test.jsonl")}], "generate": 4, "max_new_tokens": 8}
    finals = run(load_config(None, base=cfg))
    torch.manual_seed(0)  # the starting point: the preset's seeded init, rebuilt
    from phi4rv.train.setup import build_model, load_tokenizer, model_config

    c = load_config(None, base=cfg)
    start = build_model(c, c.stages["align"], model_config(c, None, load_tokenizer(c)), None).state_dict()
    aligned = load_model(finals["align"]).state_dict()
    changed = {k.split(".")[0] for k in start if not torch.equal(start[k], aligned[k])}
    assert changed == {"projector"}
    done = load_model(finals["full"]).state_dict()
    assert {k.split(".")[0] for k in aligned if not torch.equal(aligned[k], done[k])} == {"vision", "projector", "decoder"}
    records = read_metrics(tmp_path / "run" / "full" / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("train/grad_norm", "lr/decoder", "lr/vision", "lr/projector", "perf/tokens_per_s", "perf/images_per_s", "perf/peak_mem_gb"):
        assert train[-1][key] > 0, key
    final_eval = records[-1]
    assert final_eval["step"] == 2 and final_eval["eval/loss"] > 0
    # the answer accuracy is what the final model's greedy answers to the first 4 test questions make,
    # scored here by exact match (case, spacing and a final period ignored)
    from phi4rv.chat_model import ChatModel, Conversation
    from phi4rv.data.formats import read_samples
    from phi4rv.generation.sampling import SamplingParams

    cm = ChatModel.load(finals["full"], device="cpu")
    samples = list(read_samples(toy / "test.jsonl"))[:4]
    convs = [Conversation(s.messages[:-1], s.images, "auto") for s in samples]
    answers = [r.answer for r in cm.chat_batch(convs, cm.params(max_new_tokens=8, sampling=SamplingParams(temperature=0)))]
    hits = sum(" ".join(a.strip().lower().rstrip(".").split()) == str(s.meta["answer"]).strip().lower()
               for a, s in zip(answers, samples))
    assert final_eval["eval/answer_acc"] == hits / 4, (answers, [s.meta["answer"] for s in samples])
    assert (tmp_path / "run" / "full" / "curves.png").stat().st_size > 0
    from phi4rv.train.metrics import summary_writer

    if summary_writer() is not None:
        assert list((tmp_path / "run" / "full" / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_with_other_trained_parameters_says_so(reference, tmp_path):
    shutil.copytree(reference, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "toy" / "final")
    cfg = yaml.safe_load((reference / "config.yaml").read_text())
    cfg["run_dir"] = str(tmp_path / "run")
    cfg["stages"]["toy"]["train"] = {"lora": 1e-3, "projector": 1e-3}  # adapters the checkpoint does not hold
    with pytest.raises(ValueError, match=r"step-00000024: the saved trainer state does not match .*lora_A"):
        run(load_config(None, base=cfg), resume=True)
