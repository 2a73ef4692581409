"""`torchrun --nproc_per_node=2 -m phi4rv train` (FSDP2, gloo) matches one process on the same global batch,
whatever each process's share of the data holds (text only, nothing, or less than the other's)."""

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from phi4rv.checkpoint import load_model, save_checkpoint
from phi4rv.cli import main
from phi4rv.data.formats import Sample, write_jsonl
from phi4rv.processing.byte_tokenizer import build_byte_tokenizer
from phi4rv.train.config import ConfigError, load_config
from phi4rv.train.loop import run
from phi4rv.train.metrics import read_metrics
from phi4rv.train.setup import build_model, load_tokenizer, model_config
from phi4rv.train.toy import TOY_TEMPLATE, add_sample, colour_sample, toy_config, write_toy

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


needs_torchrun = pytest.mark.skipif(TORCHRUN is None or not torch.distributed.is_available(),
                                    reason="needs torch.distributed and torchrun")


def torchrun(config: Path | None, timeout: int = 240, nproc: int = 2, args: tuple = ()) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "phi4rv", "train",
         *([str(config)] if config else []), *map(str, args)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        raise
    assert proc.returncode == 0, out
    return out


def run_one_process(cfg: dict) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(load_config(None, base=cfg))
    finally:
        torch.set_num_threads(threads)


@needs_torchrun
def test_two_processes_fsdp2_match_one_process(tmp_path):
    toy = write_toy(tmp_path / "toy", n_train=96, n_test=8)
    cfgs = {}
    for name in ("one", "two"):
        cfg = toy_config(tmp_path / name, toy, steps=5)
        cfg["stages"]["toy"]["data"]["tokens_per_step"] = 2 * 768  # two micro-batches per step
        cfg["eval"] = {"datasets": [{"path": str(toy / "test.jsonl")}]}
        cfg["checkpoint"] = {"every": 3}
        cfgs[name] = cfg
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfgs["two"]))
    out = torchrun(tmp_path / "two.yaml")
    assert "2 process(es), 1 micro-batch(es) per process per step" in out
    run_one_process(cfgs["one"])  # one process accumulates both micro-batches

    one, two = (read_metrics(tmp_path / n / "toy" / "metrics.jsonl") for n in ("one", "two"))
    train = lambda rs: [(r["step"], r["train/loss"], r["data/targets"]) for r in rs if "train/loss" in r]  # noqa: E731
    assert len(train(one)) == 5
    for (s1, l1, n1), (s2, l2, n2) in zip(train(one), train(two)):
        assert s1 == s2 and n1 == n2  # the same global batch
        assert l1 == pytest.approx(l2, rel=1e-6, abs=1e-7)
    assert one[-1]["eval/loss"] == pytest.approx(two[-1]["eval/loss"], rel=1e-6)
    a, b = load_model(tmp_path / "one" / "toy" / "final").state_dict(), load_model(tmp_path / "two" / "toy" / "final").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def broken_colour_sample(rng: random.Random, idx: str) -> Sample:
    """A colour sample whose PNG is cut short inside its pixel data: the header measures (an eXIf
    chunk ahead of the pixels spares reading them), decoding fails, so the sample is dropped while
    its micro-batch loads, after planning."""
    s = colour_sample(rng, idx)
    exif = Image.Exif()
    exif[0x0112] = 1  # orientation: upright
    buf = io.BytesIO()
    Image.open(io.BytesIO(s.images[0])).save(buf, format="PNG", exif=exif)
    png = buf.getvalue()
    s.images = [png[: (png.index(b"IDAT") + len(png)) // 2]]
    return s


@needs_torchrun
def test_uneven_shares_keep_processes_in_step(tmp_path):
    """Every process runs the same collectives whatever its share: a micro-batch without images
    next to one with images, a micro-batch whose only sample is dropped while loading, an eval set
    of one micro-batch (nothing for the second process) and of three (2 + 1); two processes then
    match one process step for step."""
    data = tmp_path / "data"
    build_byte_tokenizer(data / "tokenizer", TOY_TEMPLATE)
    rng = random.Random(0)
    c, a, b = colour_sample, add_sample, broken_colour_sample
    # unshuffled, one sample per micro-batch (121-138 tokens, rows of 192), two micro-batches a step:
    # sample 2k goes to process 0 and 2k+1 to process 1 at step k
    order = [c, c, c, a, a, c, c, b, b, c, a, a]
    write_jsonl([make(rng, f"t{i}") for i, make in enumerate(order)], data / "train.jsonl", data / "images")
    write_jsonl([a(rng, "e0"), c(rng, "e1"), c(rng, "e2")], data / "test.jsonl", data / "images")

    cfgs = {}
    for name in ("one", "two"):
        cfg = toy_config(tmp_path / name, data, steps=2)
        wide = cfg["stages"].pop("toy")  # three rows a micro-batch: the whole eval set is one micro-batch
        wide["data"].update(batch_tokens=576, tokens_per_step=1152)
        narrow = {**wide, "max_steps": 6, "data": {**wide["data"], "batch_tokens": 192, "tokens_per_step": 384, "shuffle": False}}
        cfg["stages"] = {"wide": wide, "narrow": narrow}
        cfg["eval"] = {"datasets": [{"path": str(data / "test.jsonl")}], "at_start": True, "every": 2}
        cfg["loss_chunk_tokens"] = 16  # the LM head applied outside the sharded forward, in chunks
        cfgs[name] = cfg
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfgs["two"], sort_keys=False))  # stages run in order
    torchrun(tmp_path / "two.yaml")
    run_one_process(cfgs["one"])

    for stage, steps, evals in (("wide", 2, [0, 2]), ("narrow", 6, [0, 2, 4, 6])):
        one, two = (read_metrics(tmp_path / n / stage / "metrics.jsonl") for n in ("one", "two"))
        assert [r["step"] for r in one] == [r["step"] for r in two]
        assert sum("train/loss" in r for r in two) == steps
        assert [r["step"] for r in one if "eval/loss" in r] == [r["step"] for r in two if "eval/loss" in r] == evals
        for r1, r2 in zip(one, two):
            for key in ("train/loss", "data/targets", "eval/loss", "eval/token_acc"):
                if key in r1:
                    assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-6), (stage, r1["step"], key)
    for n in ("one", "two"):  # the two cut-short images were dropped while loading, not while planning
        state = json.loads((tmp_path / n / "narrow" / "step-00000006" / "trainer" / "state.json").read_text())
        assert state["counters"]["skipped_bad_image"] == 2
    a1, a2 = load_model(tmp_path / "one" / "narrow" / "final").state_dict(), load_model(tmp_path / "two" / "narrow" / "final").state_dict()
    for k in a1:
        assert torch.allclose(a1[k], a2[k], atol=1e-5), k


def losses(stage_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(stage_dir / "metrics.jsonl") if "train/loss" in r]


@needs_torchrun
def test_checkpoint_saved_by_two_processes_resumes_at_one_and_at_four(tmp_path):
    """Each process writes its own shards (DCP); a resume at another process count reshards them
    and continues the same global steps: the loss trace and the final weights are the
    uninterrupted run's, up to the order of float sums."""
    toy = write_toy(tmp_path / "toy", n_train=96, n_test=8)
    cfg = toy_config(tmp_path / "two", toy, steps=6)
    cfg["stages"]["toy"]["data"]["tokens_per_step"] = 4 * 768  # 4 micro-batches a step: 4 x 1, 2 x 2 or 1 x 4
    cfg["checkpoint"] = {"every": 3, "keep": 5, "step_weights": False}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfg))
    torchrun(tmp_path / "two.yaml")
    reference = losses(tmp_path / "two" / "toy")
    assert [s for s, _ in reference] == [1, 2, 3, 4, 5, 6]
    shards = sorted(p.name for p in (tmp_path / "two" / "toy" / "step-00000003" / "trainer" / "shards").iterdir())
    assert len(shards) == 2 and not list((tmp_path / "two" / "toy" / "step-00000003").glob("*.safetensors"))

    for world in (1, 4):
        run_dir = tmp_path / f"at-{world}"
        shutil.copytree(tmp_path / "two", run_dir)
        shutil.rmtree(run_dir / "toy" / "step-00000006")
        shutil.rmtree(run_dir / "toy" / "final")
        if world == 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                assert main(["train", "--resume", str(run_dir)]) == 0
            finally:
                torch.set_num_threads(threads)
        else:
            out = torchrun(None, nproc=4, args=("--resume", run_dir))
            assert "4 process(es), 1 micro-batch(es) per process per step" in out
        resumed = losses(run_dir / "toy")
        assert [s for s, _ in resumed] == [s for s, _ in reference]
        for (step, a), (_, b) in zip(resumed, reference):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (world, step)
        a, b = load_model(run_dir / "toy" / "final").state_dict(), load_model(tmp_path / "two" / "toy" / "final").state_dict()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (world, k)

    # without tokens_per_step a step is one micro-batch per process: another process count would
    # make other steps, so the resume refuses and says what keeps them
    run_dir = tmp_path / "other-steps"
    shutil.copytree(tmp_path / "two", run_dir)
    shutil.rmtree(run_dir / "toy" / "final")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["stages"]["toy"]["data"]["tokens_per_step"]
    saved["run_dir"] = str(run_dir)
    with pytest.raises(ConfigError, match="tokens_per_step=3072"):
        run(load_config(None, base=saved), resume=True)


@needs_torchrun
def test_two_processes_fill_their_shards_from_a_bf16_checkpoint_as_one_process_loads_it(tmp_path):
    """Under torchrun the model is built on the meta device and each process reads only its rows of
    each stored tensor (bf16 on disk, float32 in training), LoRA's A matrices drawn as one process
    draws them (rank 3: rows split 2 + 1): the evaluation before any step, every step's loss and
    the merged export equal one process's."""
    toy = write_toy(tmp_path / "toy", n_train=48, n_test=8)
    base = load_config(None, base=toy_config(tmp_path / "base", toy))
    tok = load_tokenizer(base)
    model = build_model(base, base.stages["toy"], model_config(base, None, tok), None)
    save_checkpoint(model, tmp_path / "ckpt", tok, dtype=torch.bfloat16)

    cfgs = {}
    for name in ("one", "two"):
        cfg = toy_config(tmp_path / name, toy, steps=3, train={"lora": 5e-3})
        cfg["model"] = {"checkpoint": str(tmp_path / "ckpt"), "dtype": "float32"}
        cfg["lora"] = {"rank": 3, "alpha": 6.0}
        cfg["stages"]["toy"]["data"]["tokens_per_step"] = 2 * 768
        cfg["eval"] = {"datasets": [{"path": str(toy / "test.jsonl")}], "at_start": True}
        cfgs[name] = cfg
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfgs["two"]))
    torchrun(tmp_path / "two.yaml")
    run_one_process(cfgs["one"])

    one, two = (read_metrics(tmp_path / n / "toy" / "metrics.jsonl") for n in ("one", "two"))
    first = lambda rs: next(r for r in rs if "eval/loss" in r)  # noqa: E731
    assert first(one)["step"] == first(two)["step"] == 0
    assert first(two)["eval/loss"] == pytest.approx(first(one)["eval/loss"], rel=1e-6)
    assert [r["train/loss"] for r in two if "train/loss" in r] == pytest.approx(
        [r["train/loss"] for r in one if "train/loss" in r], rel=1e-5)
    a, b = load_model(tmp_path / "one" / "toy" / "final").state_dict(), load_model(tmp_path / "two" / "toy" / "final").state_dict()
    stored = load_model(tmp_path / "ckpt").state_dict()
    assert any(not torch.equal(a[k], stored[k].float()) for k in a)  # the adapters were merged in
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@needs_torchrun
def test_two_processes_streaming_match_one_process(tmp_path):
    """A streamed stage (two datasets, a shuffle buffer, loader workers) under torchrun: each process
    runs the same stream and loads its own micro-batches, so two processes match one step for step,
    and the two processes' checkpoint resumes in one process to the same steps."""
    toy = write_toy(tmp_path / "toy", n_train=48, n_test=8)
    cfgs = {}
    for name in ("one", "two"):
        cfg = toy_config(tmp_path / name, toy, steps=4)
        cfg["stages"]["toy"]["data"].update(
            datasets=[{"path": str(toy / "train.jsonl"), "weight": 2}, {"path": str(toy / "long.jsonl")}],
            tokens_per_step=2 * 768, streaming=True, shuffle_buffer=16, num_workers=1)
        cfg["checkpoint"] = {"every": 2, "keep": 5, "step_weights": False}
        cfgs[name] = cfg
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfgs["two"]))
    out = torchrun(tmp_path / "two.yaml")
    assert "streamed), 2 process(es), 1 micro-batch(es) per process per step" in out
    run_one_process(cfgs["one"])
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "toy" / "step-00000004")
    shutil.rmtree(tmp_path / "resumed" / "toy" / "final")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--resume", str(tmp_path / "resumed")]) == 0
    finally:
        torch.set_num_threads(threads)

    one = read_metrics(tmp_path / "one" / "toy" / "metrics.jsonl")
    train = lambda rs: [(r["step"], r["train/loss"], r["data/targets"]) for r in rs if "train/loss" in r]  # noqa: E731
    assert [s for s, _, _ in train(one)] == [1, 2, 3, 4]
    a = load_model(tmp_path / "one" / "toy" / "final").state_dict()
    for other in ("two", "resumed"):
        steps = train(read_metrics(tmp_path / other / "toy" / "metrics.jsonl"))
        assert len(steps) == 4, other
        for (s1, l1, n1), (s2, l2, n2) in zip(train(one), steps):
            assert s1 == s2 and n1 == n2, other  # the same global batch
            assert l1 == pytest.approx(l2, rel=1e-6, abs=1e-7), (other, s1)
        b = load_model(tmp_path / other / "toy" / "final").state_dict()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6), (other, k)
