"""The memory plan vs measured peak resident memory per process, CPU processes (gloo), world 1, 2, 4.

For each world size: `phi4rv train` (under torchrun when world > 1) runs `--steps` optimizer steps
of a model with the 15B's widths and vocabulary (hidden 5120, intermediate 17920, 40/10 heads,
vocab 100352, SigLIP-2 so400m widths) but `--layers` decoder layers and `--vision-layers` vision
layers, on text-only samples (Phi-4's tokenizer, built offline), starting from a random bf16
checkpoint of that model written first (as the 15B starts from the release: under torchrun each
process builds the model on the meta device and reads only its own rows). The loop reports every process's
peak resident set (ru_maxrss) after the last step, before the end-of-stage export (not measured). The plan (`phi4rv train CONFIG --plan --world N --plan-device cpu`)
is computed for the same config, with no image patches.

    python bench/memory_plan.py --worlds 1,2 --train lora           # ~3-4 GB per process
    python bench/memory_plan.py --worlds 1,2 --tiny                 # small widths, seconds

Mind the machine: the total is about world x the per-process figure; check `free -g` first.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import yaml
from common import machine, print_machine, print_table, write_json

from phi4rv.data.formats import write_jsonl
from phi4rv.train.config import load_config
from phi4rv.train.plan import GiB, plan_memory
from phi4rv.train.toy import add_sample

ROOT = Path(__file__).resolve().parent.parent
TRAIN = {"lora": {"lora": 1e-4}, "full": {"vision": 1e-5, "projector": 1e-5, "decoder": 1e-5},
         "decoder": {"decoder": 1e-5}, "projector": {"projector": 1e-4}}


def config(args, run_dir: Path, data: Path, checkpoint: Path | None = None) -> dict:
    """The training config; with `checkpoint` the model starts from it (as training the 15B does:
    under torchrun each process then reads only its own rows), else from the preset."""
    overrides = {"decoder.num_hidden_layers": args.layers, "vision.num_hidden_layers": args.vision_layers}
    if args.tiny:
        overrides.update({"decoder.hidden_size": 256, "decoder.intermediate_size": 512, "decoder.num_attention_heads": 4,
                          "decoder.num_key_value_heads": 2, "vision.hidden_size": 64, "vision.intermediate_size": 128,
                          "vision.num_attention_heads": 2})
    model = ({"checkpoint": str(checkpoint), "tokenizer": "phi4", "dtype": args.model_dtype} if checkpoint else
             {"preset": "phi4rv-15b", "tokenizer": "phi4", "dtype": args.model_dtype, "overrides": overrides})
    return {
        "run_dir": str(run_dir),
        "model": model,
        "precision": args.precision,
        "activation_checkpointing": args.checkpointing,
        "loss_chunk_tokens": args.chunk,
        "stages": {"s": {"train": TRAIN[args.train], "max_steps": args.steps, "warmup_steps": 0,
                         "data": {"datasets": [{"path": str(data)}], "max_len": 256, "batch_tokens": args.batch_tokens}}},
        "log": {"progress": False, "plot": False, "tensorboard": False},
    }


def write_checkpoint(args, work: Path) -> Path:
    """The preset's model (15B widths, reduced depth) as a random bf16 checkpoint in the release layout."""
    from phi4rv.checkpoint import init_checkpoint
    from phi4rv.train.setup import load_tokenizer, model_config

    cfg = load_config(None, base=config(args, work / "unused", work / "data.jsonl"))
    mc = model_config(cfg, None, load_tokenizer(cfg))
    return init_checkpoint(mc, work / "ckpt", torch.bfloat16, seed=0)


def measure(args, world: int, work: Path, checkpoint: Path) -> list[float]:
    cfg_path = work / f"w{world}.yaml"
    cfg_path.write_text(yaml.safe_dump(config(args, work / f"run{world}", work / "data.jsonl", checkpoint), sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if world == 1:
        cmd = [sys.executable, "-m", "phi4rv", "train", str(cfg_path)]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [torchrun, "--standalone", f"--nproc_per_node={world}", "-m", "phi4rv", "train", str(cfg_path)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, peaks = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if m := re.match(r"peak memory per process \(GiB\): (.*)", line):
                peaks = [float(x) for x in m.group(1).split()]  # after the last step, before the export
        proc.wait()  # the run ends by itself (killing torchrun would leave its workers running)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if peaks is None:
        raise RuntimeError(f"world {world}: no peak memory report\n" + "".join(lines[-30:]))
    return peaks


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vision-layers", type=int, default=2, help="the last one is unused, as in the release")
    p.add_argument("--train", choices=list(TRAIN), default="lora")
    p.add_argument("--model-dtype", default="bfloat16")
    p.add_argument("--precision", default="float32")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--chunk", type=int, default=256, help="loss_chunk_tokens")
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]

    work = Path(tempfile.mkdtemp(prefix="memory_plan_"))
    try:
        rng = random.Random(0)
        write_jsonl([add_sample(rng, f"a{i}") for i in range(args.samples)], work / "data.jsonl")
        checkpoint = write_checkpoint(args, work)
        rows, results = [], []
        for world in worlds:
            tokens_per_step = args.batch_tokens * world
            cfg = load_config(None, base=config(args, work / "plan", work / "data.jsonl", checkpoint))
            cfg.stages["s"].data.tokens_per_step = tokens_per_step
            from phi4rv.train.setup import load_tokenizer, model_config

            mc = model_config(cfg, None, load_tokenizer(cfg))
            plan = plan_memory(cfg, "s", mc, world, "cpu", image_fraction=0.0)
            peaks = measure(args, world, work, checkpoint)
            for rank, peak in enumerate(peaks):
                err = plan.total / GiB / peak - 1
                rows.append([world, rank, plan.total / GiB, peak, f"{100 * err:+.1f}%"])
                results.append({"world": world, "rank": rank, "plan_gib": plan.total / GiB, "measured_gib": peak,
                                "error": err, "plan_parts_gib": {k: v / GiB for k, v in plan.parts.items()}})
        info = machine(torch.device("cpu"), torch.float32)
        print_machine(info)
        print(f"model: 15B widths{' (tiny)' if args.tiny else ''}, vocab {mc.decoder.vocab_size}, {args.layers} decoder / "
              f"{args.vision_layers} vision layers; train {args.train}, weights {args.model_dtype}, compute {args.precision}, "
              f"checkpointing {'on' if args.checkpointing else 'off'}, loss chunk {args.chunk}, {args.batch_tokens} tokens "
              f"per micro-batch, {args.steps} steps\n")
        print_table(["world", "rank", "plan GiB", "measured peak RSS GiB", "plan vs measured"], rows)
        print("\nplan line items (GiB per process): " + "; ".join(
            f"world {r['world']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["plan_parts_gib"].items())
            for r in results if r["rank"] == 0))
        figures = {"benchmark": "memory_plan", "machine": info, "config": {k: str(v) for k, v in vars(args).items()},
                   "results": results}
        write_json(args.json, figures)
        return figures
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
