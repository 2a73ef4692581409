"""Streamed training data (`data.streaming`): readers that match the whole-dataset readers and resume
at any sample, a stream that resumes exactly from its saved state, exact resume after SIGKILL, and
memory that does not grow with the dataset."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from phi4rv.checkpoint import load_model
from phi4rv.cli import main
from phi4rv.data.dataset import SampleEncoder
from phi4rv.data.formats import DatasetFormatError, StreamReader, read_samples, write_jsonl, write_parquet
from phi4rv.data.packing import pack_plan
from phi4rv.processing.image import ImageProcessorConfig
from phi4rv.processing.tokenizer import Tokenizer
from phi4rv.train.config import ConfigError, DataConfig, DatasetConfig, load_config
from phi4rv.train.loop import run
from phi4rv.train.metrics import read_metrics
from phi4rv.train.stream import DataStream
from phi4rv.train.toy import add_sample, colour_sample, toy_config, toy_samples, write_toy

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """Toy data small enough that a few steps make several passes, plus the two-image dialogues as
    a Parquet folder of two shards with row groups of 3 rows."""
    out = write_toy(tmp_path_factory.mktemp("toy"), n_train=40, n_test=8, seed=0)
    samples = list(read_samples(out / "long.jsonl"))
    (out / "long").mkdir()
    for k, part in enumerate((samples[:4], samples[4:])):
        write_parquet(part, out / "long" / f"part-{k}.parquet")
        pq.write_table(pq.read_table(out / "long" / f"part-{k}.parquet"), out / "long" / f"part-{k}.parquet", row_group_size=3)
    return out


@pytest.fixture(scope="module")
def encoder(toy) -> SampleEncoder:
    tok = Tokenizer.from_dir(toy / "tokenizer")
    return SampleEncoder(tok, ImageProcessorConfig(min_num_patches=4, max_num_patches=16), max_len=192)


# ---- readers -----------------------------------------------------------------------------------


def llava_jsonl(path: Path) -> Path:
    """LLaVA records, one per line, with blank lines between some and no id on one."""
    recs = [{"id": f"l{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(7)]
    del recs[3]["id"]
    lines = [json.dumps(r) + ("\n\n" if i % 3 == 0 else "\n") for i, r in enumerate(recs)]
    path.write_text("".join(lines))
    return path


@pytest.mark.parametrize("name", ["train.jsonl", "long", "llava.jsonl"])
def test_streamed_reader_matches_whole_reader_and_resumes_at_every_sample(toy, tmp_path, name):
    path = llava_jsonl(tmp_path / name) if name == "llava.jsonl" else toy / name
    whole = list(read_samples(path))
    reader = StreamReader(path)
    streamed = list(reader.read())
    assert [s for _, s in streamed] == whole
    if name == "long":
        assert {p[:2] for p, _ in streamed} == {(0, 0), (0, 1), (1, 0), (1, 1)}  # shards of 4 and 6 rows in groups of 3
    for k, (pos, _) in enumerate(streamed):
        assert [s for _, s in reader.read(after=pos)] == whole[k + 1:]
    picks = [streamed[i][0] for i in (5, 0, 5, len(streamed) - 1)]
    assert reader.read_at(picks) == [whole[5], whole[0], whole[5], whole[-1]]


def test_a_json_array_is_refused_with_a_hint(toy, tmp_path):
    write_jsonl(toy_samples(3, 0), tmp_path / "a.jsonl")
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]))
    with pytest.raises(DatasetFormatError, match=r"cannot be streamed.*\.jsonl"):
        StreamReader(array)
    cfg = toy_config(tmp_path / "run", toy, steps=2)
    cfg["stages"]["toy"]["data"].update(streaming=True, datasets=[{"path": str(array)}])
    with pytest.raises(ConfigError, match=r"datasets\.0\.path: a \.json array cannot be streamed"):
        load_config(None, base=cfg)
    cfg = toy_config(tmp_path / "run", toy, steps=2)
    cfg["stages"]["toy"]["data"]["streaming"] = True
    del cfg["stages"]["toy"]["max_steps"]
    with pytest.raises(ConfigError, match=r"stages\.toy\.max_steps: a streamed stage .* needs max_steps"):
        load_config(None, base=cfg)


# ---- the stream --------------------------------------------------------------------------------


def ids(mb) -> list[list[str]]:
    return [[it.sample.id for it in row] for row in mb]


def test_unshuffled_stream_packs_like_pack_plan_and_repeats_passes(toy, encoder):
    data = DataConfig(max_len=192, batch_tokens=768, shuffle=False)
    stream = DataStream([DatasetConfig(str(toy / "train.jsonl"))], encoder, data, seed=0)
    samples = list(read_samples(toy / "train.jsonl"))
    lengths = [len(encoder.encode(s)) for s in samples]
    expected = [[[samples[i % len(samples)].id for i in row] for row in mb] for mb in pack_plan(lengths * 3, 192, 768)]
    got = [ids(stream.next_micro_batch()) for _ in range(len(expected) - 1)]  # the last one is still open
    assert got == expected[:-1]
    assert stream.passes[0] == 2


def test_stream_resumes_exactly_from_its_saved_state(toy, encoder):
    """Two datasets mixed by weight (JSON lines and Parquet), shuffled, several passes: a stream
    restored from the JSON of another's state gives the same micro-batches from there on."""
    specs = [DatasetConfig(str(toy / "train.jsonl"), weight=3), DatasetConfig(str(toy / "long"), weight=1)]
    data = DataConfig(max_len=192, batch_tokens=768, shuffle_buffer=16)
    a = DataStream(specs, encoder, data, seed=7)
    first = [ids(a.next_micro_batch()) for _ in range(9)]
    state = json.loads(json.dumps(a.state()))
    rest = [ids(a.next_micro_batch()) for _ in range(30)]
    assert min(a.passes) >= 1  # both datasets wrapped around
    assert {i[0] for mb in first + rest for row in mb for i in row} == {"t", "l"}  # train* and long*
    b = DataStream(specs, encoder, data, seed=7)
    b.restore(state)
    assert [ids(b.next_micro_batch()) for _ in range(30)] == rest
    assert [ids(DataStream(specs, encoder, data, seed=8).next_micro_batch()) for _ in range(9)] != first  # seeded


def test_unusable_samples_are_skipped_and_counted_on_every_pass(toy, encoder, tmp_path):
    rng = random.Random(0)
    samples = [colour_sample(rng, f"c{i}") for i in range(6)]
    samples[1].images = [str(tmp_path / "gone.png")]
    samples[4].messages[1]["content"] = "red " * 100  # longer than max_len
    write_jsonl(samples, tmp_path / "d.jsonl", tmp_path / "images")
    data = DataConfig(max_len=192, batch_tokens=192, shuffle=False)  # one sample per micro-batch
    stream = DataStream([DatasetConfig(str(tmp_path / "d.jsonl"))], encoder, data, seed=0)
    got = [ids(stream.next_micro_batch())[0][0] for _ in range(7)]
    assert got == ["c0", "c2", "c3", "c5", "c0", "c2", "c3"]
    assert stream.skipped == {"missing_image": 2, "too_long": 2}

    cfg = toy_config(tmp_path / "run", toy, steps=3)
    cfg["stages"]["toy"]["data"].update(datasets=[{"path": str(tmp_path / "d.jsonl")}], streaming=True, shuffle=False,
                                        batch_tokens=192)
    run(load_config(None, base=cfg))
    counters = json.loads((tmp_path / "run" / "toy" / "step-00000003" / "trainer" / "state.json").read_text())["counters"]
    assert counters["samples"] == 3 and counters["skipped_missing_image"] == 1 and counters["skipped_too_long"] == 1


# ---- training ----------------------------------------------------------------------------------


def losses(stage_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(stage_dir / "metrics.jsonl") if "train/loss" in r]


def streamed_config(run_dir: Path, toy: Path, steps: int, **data) -> dict:
    cfg = toy_config(run_dir, toy, steps=steps)
    cfg["stages"]["toy"]["data"].update(
        datasets=[{"path": str(toy / "train.jsonl"), "weight": 3}, {"path": str(toy / "long"), "weight": 1}],
        streaming=True, shuffle_buffer=16, **data)
    return cfg


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_sigkill_then_resume_of_a_streamed_stage_reproduces_the_run(toy, tmp_path, capsys):
    """An uninterrupted streamed run against one killed after its step-6 checkpoint and resumed
    (with 2 loader workers: they change nothing, and exit with the killed trainer): the same losses,
    step by step, and weights."""
    ref = tmp_path / "ref"
    cfg = streamed_config(ref, toy, steps=12)
    cfg["checkpoint"] = {"every": 3, "keep": 10}
    run(load_config(None, base=cfg))
    assert json.loads((ref / "toy" / "step-00000006" / "trainer" / "state.json").read_text())["streaming"] is True

    cfg = streamed_config(tmp_path / "run", toy, steps=12, num_workers=2)
    cfg["checkpoint"] = {"every": 3, "keep": 10}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "phi4rv", "train", str(tmp_path / "c.yaml")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    target = tmp_path / "run" / "toy" / "step-00000006" / "trainer" / "state.json"
    deadline = time.time() + 120
    while not target.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.01)
    workers = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)  # the trainer only: its loader workers must not outlive it
    proc.wait()
    deadline = time.time() + 30
    while any(running(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    leftover = [w for w in workers if running(w)]
    for w in leftover:
        os.kill(w, signal.SIGKILL)
    assert not leftover, "loader workers outlived the killed trainer"
    assert not (tmp_path / "run" / "toy" / "final").exists(), "the run finished before it was killed"
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert "resuming from" in capsys.readouterr().err
    assert [s for s, _ in losses(ref / "toy")] == list(range(1, 13))
    assert losses(tmp_path / "run" / "toy") == losses(ref / "toy")  # exactly
    a, b = load_model(tmp_path / "run" / "toy" / "final").state_dict(), load_model(ref / "toy" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_streaming_switched_is_refused(toy, tmp_path):
    cfg = streamed_config(tmp_path / "run", toy, steps=2)
    run(load_config(None, base=cfg))
    shutil.rmtree(tmp_path / "run" / "toy" / "final")  # as if killed after its last checkpoint
    cfg["stages"]["toy"]["data"]["streaming"] = False
    with pytest.raises(ConfigError, match="saved with data.streaming: true"):
        run(load_config(None, base=cfg), resume=True)


# ---- memory ------------------------------------------------------------------------------------

PEAK = textwrap.dedent("""
    import sys
    from phi4rv.data.dataset import SampleEncoder
    from phi4rv.processing.image import ImageProcessorConfig
    from phi4rv.processing.tokenizer import Tokenizer
    from phi4rv.train.batches import load_micro_batch, measure, plan_stage
    from phi4rv.train.config import DataConfig, DatasetConfig, StageConfig
    from phi4rv.train.distributed import Dist
    from phi4rv.train.stream import DataStream

    tokenizer, path, streaming = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    encoder = SampleEncoder(Tokenizer.from_dir(tokenizer), ImageProcessorConfig(), 192)
    data = DataConfig(datasets=[DatasetConfig(path)], max_len=192, batch_tokens=768, shuffle_buffer=64)
    if streaming:  # every micro-batch of one whole pass, loaded as training loads them
        stream = DataStream(data.datasets, encoder, data, seed=0)
        while stream.passes[0] == 0:
            load_micro_batch(encoder, [[it.sample for it in row] for row in stream.next_micro_batch()], 0)
    else:  # what the whole-dataset path holds for a stage
        sources = measure(data.datasets, encoder, Dist())
        plan = plan_stage(StageConfig(data=data, max_steps=1), sources, 0, 1)
    # the peak of this process's own memory: ru_maxrss would also count the parent's at the fork
    print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) // 1024)
""")


def peak_mb(toy: Path, path: Path, streaming: bool) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PEAK, str(toy / "tokenizer"), str(path), "1" if streaming else "0"],
                         env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_streamed_memory_does_not_grow_with_the_dataset(toy, tmp_path):
    """1,000 vs 10,000 text samples of ~16 kB each (a bulky meta field): the streamed pass over all of
    them peaks the same within 16 MB, while the whole-dataset path grows by far more (the control)."""
    rng = random.Random(0)
    pad = "x" * 16000
    for n in (1000, 10000):
        with open(tmp_path / f"d{n}.jsonl", "w") as f:
            for i in range(n):
                s = add_sample(rng, f"a{i}")
                f.write(json.dumps({"id": s.id, "messages": s.messages, "note": pad}) + "\n")
    small, big = (peak_mb(toy, tmp_path / f"d{n}.jsonl", True) for n in (1000, 10000))
    whole_small, whole_big = (peak_mb(toy, tmp_path / f"d{n}.jsonl", False) for n in (1000, 10000))
    print(f"peak RSS MB: streamed {small} -> {big}, whole {whole_small} -> {whole_big}")
    assert whole_big - whole_small > 100  # ~144 MB more data: the whole-dataset path holds it
    assert abs(big - small) < 16
