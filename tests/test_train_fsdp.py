"""`torchrun --nproc_per_node=2 -m phi4rv train` (FSDP2, gloo) matches one process on the same global batch."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from phi4rv.checkpoint import load_model
from phi4rv.train.config import load_config
from phi4rv.train.loop import run
from phi4rv.train.metrics import read_metrics
from phi4rv.train.toy import toy_config, write_toy

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


@pytest.mark.skipif(TORCHRUN is None or not torch.distributed.is_available(), reason="needs torch.distributed and torchrun")
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
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "phi4rv", "train", str(tmp_path / "two.yaml")],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        raise
    assert proc.returncode == 0, out
    assert "2 process(es), 1 micro-batch(es) per process per step" in out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(load_config(None, base=cfgs["one"]))  # one process accumulates both micro-batches
    finally:
        torch.set_num_threads(threads)

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
