"""QLoRA on the 15B at its real size, on this machine: `phi4rv train` on a full-size checkpoint.

The checkpoint (e.g. the random 15B that `big_model.py --keep` or `phi4rv init --preset phi4rv-15b
--dtype bfloat16` writes) is read with its decoder layers quantized (`model.quantize`), LoRA
adapters on the fused projections, activation checkpointing and the chunked loss; `--steps`
optimizer steps run on short text samples (Phi-4's tokenizer, built offline), then the step
checkpoint holding the trained adapters is written. Reported: load time (start to first step),
time per step, the loop's peak RSS after the last step, the peak RSS of the whole run (checkpoint
included), the adapters' size, the loss per step, and the memory plan's figure for the same config.
The merged release-format export (30 GB for the 15B) is skipped unless `--export`.

    python bench/scale.py --checkpoint /work/big15b --quantize int4 --steps 2 --tokens 128
    python bench/scale.py --tiny          # a small random checkpoint with the 15B's vocabulary, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import yaml
from common import machine, print_machine, print_table, write_json

from phi4rv.checkpoint import init_checkpoint
from phi4rv.data.formats import write_jsonl
from phi4rv.train.config import load_config
from phi4rv.train.metrics import read_metrics
from phi4rv.train.plan import GiB, plan_memory
from phi4rv.train.setup import load_tokenizer, model_config
from phi4rv.train.toy import add_sample

ROOT = Path(__file__).resolve().parent.parent
TINY = {"decoder.hidden_size": 256, "decoder.intermediate_size": 512, "decoder.num_attention_heads": 4,
        "decoder.num_key_value_heads": 2, "decoder.num_hidden_layers": 2, "vision.hidden_size": 64,
        "vision.intermediate_size": 128, "vision.num_attention_heads": 2, "vision.num_hidden_layers": 2}


def tiny_checkpoint(out: Path) -> Path:
    """A small random bf16 checkpoint with the 15B's vocabulary (so Phi-4's tokenizer fits it)."""
    from phi4rv.config import preset

    mc = preset("phi4rv-15b")
    for dotted, value in TINY.items():
        part, field = dotted.split(".")
        setattr(getattr(mc, part), field, value)
    return init_checkpoint(mc, out, torch.bfloat16, seed=0)


def config(args, checkpoint: Path, run_dir: Path, data: Path) -> dict:
    return {
        "run_dir": str(run_dir),
        "model": {"checkpoint": str(checkpoint), "tokenizer": "phi4", "dtype": "bfloat16", "quantize": args.quantize},
        "precision": "bfloat16",
        "activation_checkpointing": True,
        "loss_chunk_tokens": 128,
        "lora": {"rank": args.rank, "alpha": 2.0 * args.rank},
        "checkpoint": {"every": 0, "step_weights": False},
        "stages": {"lora": {"train": {"lora": 1e-4}, "max_steps": args.steps, "warmup_steps": 0,
                            "data": {"datasets": [{"path": str(data)}], "max_len": args.tokens,
                                     "batch_tokens": args.tokens, "shuffle": False}}},
        "log": {"progress": False, "plot": False, "tensorboard": False},
    }


def run_training(cfg_path: Path, export: bool, threads: int) -> dict:
    """`phi4rv train` in a child process: its output's milestones with their times, then the
    child's peak RSS (ru_maxrss of waited-for children)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "phi4rv", "train", str(cfg_path)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out: dict = {"lines": []}
    try:
        for line in proc.stdout:
            out["lines"].append(line)
            now = time.perf_counter() - t0
            if line.startswith("parts (") and "built_s" not in out:
                out["built_s"] = now
            if m := re.match(r"peak memory per process \(GiB\): (.*)", line):
                out["loop_peak_gib"] = float(m.group(1).split()[0])
            if m := re.match(r"saved (.*step-\d+)", line):
                out["adapters"] = Path(m.group(1).strip())
                out["saved_s"] = now
                if not export:
                    break
            if m := re.match(r"stage \S+ done: (.*)", line):
                out["export"] = Path(m.group(1).strip())
                out["export_s"] = now
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the merged export is not part of the run unless asked
        proc.wait()
    out["run_peak_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    if "adapters" not in out:
        raise RuntimeError("the training run did not save its adapters\n" + "".join(out["lines"][-30:]))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="a full-size checkpoint folder (default with --tiny: a small one)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--quantize", choices=["int8", "int4"], default="int4")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128, help="tokens per micro-batch (= max sample length)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--export", action="store_true", help="also write the merged release-format export")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.checkpoint is None and not args.tiny:
        p.error("give --checkpoint DIR (a full-size checkpoint) or --tiny")

    work = Path(tempfile.mkdtemp(prefix="scale_"))
    try:
        ckpt = args.checkpoint or tiny_checkpoint(work / "ckpt")
        rng = random.Random(0)
        write_jsonl([add_sample(rng, f"a{i}") for i in range(8 * args.steps)], work / "data.jsonl")
        cfg_dict = config(args, ckpt, work / "run", work / "data.jsonl")
        (work / "train.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
        cfg = load_config(None, base=cfg_dict)
        mc = model_config(cfg, None, load_tokenizer(cfg))
        plan = plan_memory(cfg, "lora", mc, 1, "cpu", image_fraction=0.0)

        run = run_training(work / "train.yaml", args.export, args.threads)
        records = [r for r in read_metrics(work / "run" / "lora" / "metrics.jsonl") if "train/loss" in r]
        adapters = sum(f.stat().st_size for f in (run["adapters"] / "trainer" / "shards").iterdir())
        info = machine(torch.device("cpu"), torch.bfloat16)
        print_machine(info)
        n_params = json.loads((Path(ckpt) / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2
        print(f"checkpoint: {ckpt} (~{n_params / 1e9:.2f}B parameters stored in bf16), decoder {mc.decoder.num_hidden_layers} layers; "
              f"QLoRA {args.quantize} base, r={args.rank}, bf16 compute, activation checkpointing, {args.tokens} tokens a step\n")
        rows = [[r["step"], f"{r['train/loss']:.4f}", f"{r['perf/step_s']:.1f}", f"{r['perf/peak_mem_gb']:.2f}"] for r in records]
        print_table(["step", "loss", "step s", "peak RSS GiB so far"], rows)
        print(f"\nstart to the model built (tokenizer, data measured, checkpoint read and quantized): {run['built_s']:.1f} s")
        print(f"peak RSS: {run['loop_peak_gib']:.2f} GiB after the last step, {run['run_peak_gib']:.2f} GiB for the whole run "
              f"(the plan: {plan.total / GiB:.2f} GiB: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in plan.parts.items()) + ")")
        print(f"adapters + their AdamW state saved: {adapters / 2**20:.1f} MiB ({run['adapters'].name})")
        figures = {"benchmark": "scale", "machine": info, "config": {k: str(v) for k, v in vars(args).items()},
                   "steps": [{k: r[k] for k in ("step", "train/loss", "perf/step_s", "perf/peak_mem_gb")} for r in records],
                   "loop_peak_gib": run["loop_peak_gib"], "run_peak_gib": run["run_peak_gib"], "plan_gib": plan.total / GiB,
                   "adapters_bytes": adapters, "built_s": run["built_s"], "parameters": n_params,
                   "decoder_layers": mc.decoder.num_hidden_layers}
        if "export" in run:
            index = json.loads((run["export"] / "model.safetensors.index.json").read_text())
            figures["export"] = {"seconds": run["export_s"] - run["saved_s"], "bytes": index["metadata"]["total_size"],
                                 "tensors": len(index["weight_map"]), "shards": len(set(index["weight_map"].values()))}
            e = figures["export"]
            print(f"merged release-format export: {e['seconds']:.1f} s, {e['bytes'] / 1e9:.2f} GB in {e['shards']} shards, "
                  f"{e['tensors']} tensors")
        write_json(args.json, figures)
        return figures
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
