"""The 15B at its real size on this machine: write a random bf16 checkpoint, load it int8 / w8a8 / int4, chat.

    python bench/big_model.py --dir /work/big15b                    # the full 15.1B, ~30 GB on disk
    python bench/big_model.py --dir /tmp/big2 --layers 2            # real widths, 2 decoder layers (minutes)
    python bench/big_model.py --dir /work/big15b --keep --quantize int4   # keep the checkpoint afterwards

Phases, each in its own child process so that its peak RSS (VmHWM, from the kernel) is its own:
1. write: `phi4rv init --preset phi4rv-15b --dtype bfloat16` (time, peak RSS, bytes written);
2. per `--quantize` mode: `ChatModel.load(quantize=...)` (time, peak RSS, resident weights), then a
   text prompt and an image prompt at the minimum patch budget (256 patches), greedy, exactly
   `--new-tokens` tokens (stop tokens ignored): time to first token (preprocess + vision + prefill)
   and decode tokens/s (first token excluded), `--repeats` runs each, median and best;
   decode as a fraction of the memory-bandwidth roofline: bandwidth / bytes read per decode step
   (every decoder weight but the embedding table, as stored after quantization, plus the KV cache
   so far). The bandwidth is a copy kernel's bytes moved (read + write, as `common.machine_rates`
   counts them, 256 MiB a side: 8x the L3 cache), best of 5, measured right before and right after
   each run and averaged: this machine's bandwidth switches between two levels (~42 and ~75 GB/s)
   from one minute to the next, so a probe taken minutes away can be at the other level. A run
   whose two probes differ by more than 15% straddled a switch and is marked.
A load phase runs only when MemAvailable leaves room for its peak (`--min-free-gb`, per mode);
otherwise it is skipped and the exact command is printed. The checkpoint is deleted at the end
unless `--keep`. This is a measurement, not a comparison: nothing here has two sides to alternate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the phi4rv command does (phi4rv/cli.py)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, print_table, probe_bandwidth, probed_fraction

GB = 1e9
# Peak RSS each mode may reach on the 24 GB machine (the budget) and the free memory a
# load phase waits for before it starts (the machine is shared).
BUDGET_GB = {"int8": 22.0, "w8a8": 22.0, "int4": 12.0, "none": 31.5}  # w8a8 holds int8's tensors
MIN_FREE_GB = {"int8": 22.0, "w8a8": 22.0, "int4": 14.0, "none": 32.0}
IMAGE = Path(__file__).resolve().parent.parent / "examples" / "images" / "photo.jpg"


def status(key: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))


def mem_available() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))


def progress(line: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ---- child phases -------------------------------------------------------------------------------


def phase_write(args) -> dict:
    from phi4rv.config import preset

    reset_peak()
    t0 = time.perf_counter()
    if args.layers is None and not args.tiny:
        from phi4rv.cli import main as cli

        rc = cli(["init", "--preset", "phi4rv-15b", "--dtype", "bfloat16", "--out", str(args.dir)])
        if rc:
            raise SystemExit(rc)
    else:
        import tempfile

        from phi4rv.checkpoint import init_checkpoint
        from phi4rv.processing.chat import DEFAULT_CHAT_TEMPLATE
        from phi4rv.processing.tokenizer import Tokenizer, build_phi4_tokenizer

        cfg = preset("tiny" if args.tiny else "phi4rv-15b")
        if args.layers is not None:
            cfg.decoder.num_hidden_layers = args.layers
        with tempfile.TemporaryDirectory() as tok:
            build_phi4_tokenizer(tok, chat_template=DEFAULT_CHAT_TEMPLATE)
            tokenizer = Tokenizer.from_dir(tok)
        init_checkpoint(cfg, args.dir, torch.bfloat16, tokenizer=tokenizer)
    seconds = time.perf_counter() - t0
    written = sum(f.stat().st_size for f in Path(args.dir).glob("*.safetensors"))
    return {"seconds": seconds, "peak_rss": status("VmHWM"), "bytes": written,
            "shards": len(list(Path(args.dir).glob("model-*.safetensors")))}


def decode_bytes(model) -> int:
    tensors = [t for n, t in [*model.decoder.named_parameters(), *model.decoder.named_buffers()] if not n.startswith("embed_tokens")]
    return sum(t.numel() * t.element_size() for t in tensors)


def phase_run(args) -> dict:
    from phi4rv.chat_model import ChatModel
    from phi4rv.generation.sampling import SamplingParams

    reset_peak()
    t0 = time.perf_counter()
    cm = ChatModel.load(args.dir, quantize=None if args.mode == "none" else args.mode, device="cpu",
                        dtype="bfloat16")
    load_s = time.perf_counter() - t0
    load_peak = status("VmHWM")
    progress(f"{args.mode}: loaded in {load_s:.0f} s, peak RSS {load_peak / GB:.2f} GB")
    model = cm.model
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    per_token = decode_bytes(model)
    from PIL import Image

    photo = Image.open(IMAGE).convert("RGB")
    side = min(photo.size)
    square = photo.crop((0, 0, side, side)).resize((256, 256))  # 16x16 patches: the minimum budget, 256
    params = cm.params(max_new_tokens=args.new_tokens, sampling=SamplingParams(temperature=0), stop_ids=())
    prompts = {k: v for k, v in {
        "text": ([{"role": "user", "content": "Explain in three sentences why the sky is blue."}], []),
        "image": ([{"role": "user", "content": "<image>\nWhat is in this picture?"}], [square]),
    }.items() if k in args.prompts.split(",")}
    out = {}
    for name, (messages, images) in prompts.items():
        runs = []
        for _ in range(args.repeats):
            bw_before = probe_bandwidth(args.tiny)
            r = cm.chat(messages, images, mode="nothink", params=params)
            bw_after = probe_bandwidth(args.tiny)
            n = r.usage["completion_tokens"]
            kv = model.cfg.decoder
            kv_bytes = 2 * kv.num_hidden_layers * kv.num_key_value_heads * kv.head_dim * 2 * (r.usage["prompt_tokens"] + n / 2)
            runs.append({
                "ttft_s": r.timing["preprocess"] + r.timing["vision"] + r.timing["prefill"],
                "vision_s": r.timing["vision"],
                "prefill_s": r.timing["prefill"],
                "decode_tok_s": (n - 1) / r.timing["decode"],
                "prompt_tokens": r.usage["prompt_tokens"],
                "image_tokens": r.usage["image_tokens"],
                "new_tokens": n,
                "kv_bytes": kv_bytes,
                "bandwidth_before_after": [bw_before, bw_after],
            })
            progress(f"{args.mode} {name}: TTFT {runs[-1]['ttft_s']:.1f} s, decode {runs[-1]['decode_tok_s']:.3f} tok/s, "
                     f"copy probe {bw_before / GB:.1f} / {bw_after / GB:.1f} GB/s before / after")
        out[name] = runs
    peak = status("VmHWM")
    return {"load_s": load_s, "load_peak_rss": load_peak, "resident_bytes": resident, "decode_bytes": per_token,
            "prompts": out, "peak_rss": peak, "threads": torch.get_num_threads()}


# ---- parent -------------------------------------------------------------------------------------


def child(args, phase: str, mode: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--dir", str(args.dir), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats), "--prompts", args.prompts]
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    if args.tiny:
        cmd += ["--tiny"]
    if mode:
        cmd += ["--mode", mode]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # the child's progress lines pass through on stderr
    if out.returncode:
        raise SystemExit(f"{phase} {mode or ''} failed (status {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def command_line(args, mode: str) -> str:
    parts = ["python bench/big_model.py", f"--dir {args.dir}", f"--quantize {mode}", "--skip-write", "--keep"]
    if args.layers is not None:
        parts.append(f"--layers {args.layers}")
    return " ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, required=True, help="where the checkpoint is written (needs ~30.5 GB free)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the release's 40)")
    p.add_argument("--quantize", default="int4,int8", help="modes to load, in order: int8, w8a8, int4, none (bf16)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", default="text,image", help="which prompts to run, in order")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    p.add_argument("--skip-write", action="store_true", help="reuse the checkpoint already in --dir")
    p.add_argument("--force", action="store_true", help="load even when MemAvailable is below --min-free-gb")
    p.add_argument("--min-free-gb", type=float, default=None, help="override the per-mode free-memory gate")
    p.add_argument("--tiny", action="store_true", help="the tiny preset instead of the 15B (a smoke test of the script)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--phase", choices=["write", "run"], help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase:
        print(json.dumps(phase_write(args) if args.phase == "write" else phase_run(args)))
        return

    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
               "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1),
               "load_avg_1m": round(os.getloadavg()[0], 2)}
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), flush=True)
    results: dict = {"machine": machine, "layers": args.layers or 40, "runs": {}, "skipped": {}}
    try:
        if not args.skip_write:
            shutil.rmtree(args.dir, ignore_errors=True)
            w = child(args, "write")
            results["write"] = w
            print(f"write: {w['bytes'] / GB:.1f} GB in {w['shards']} shards, {w['seconds']:.0f} s "
                  f"({w['bytes'] / GB / w['seconds']:.2f} GB/s), peak RSS {w['peak_rss'] / GB:.2f} GB", flush=True)
        for mode in args.quantize.split(","):
            need = args.min_free_gb if args.min_free_gb is not None else MIN_FREE_GB[mode]
            if args.layers is not None:
                need = min(need, 8.0)  # reduced depth: a few GB
            if args.tiny:
                need = 0.0
            free = mem_available() / GB
            if free < need and not args.force:
                results["skipped"][mode] = {"free_gb": round(free, 1), "command": command_line(args, mode)}
                print(f"{mode}: skipped, {free:.1f} GB available < {need:.0f} GB; run later: {command_line(args, mode)}",
                      flush=True)
                continue
            print(f"{mode}: {free:.1f} GB available, loading", flush=True)
            r = child(args, "run", mode)
            results["runs"][mode] = r
            report(mode, r)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def roofline_fraction(run: dict, decode_bytes: int) -> tuple[float, bool]:
    return probed_fraction(run["decode_tok_s"] * (decode_bytes + run["kv_bytes"]), *run["bandwidth_before_after"])


def report(mode: str, r: dict) -> None:
    budget = BUDGET_GB[mode]
    print(f"\n{mode}: load {r['load_s']:.0f} s, peak RSS while loading {r['load_peak_rss'] / GB:.2f} GB "
          f"(overall {r['peak_rss'] / GB:.2f} GB, budget {budget:g} GB: {'ok' if r['peak_rss'] / GB <= budget else 'OVER'}), "
          f"resident weights {r['resident_bytes'] / GB:.2f} GB, {r['decode_bytes'] / GB:.2f} GB read per token, "
          f"{r['threads']} threads")
    rows = []
    for name, runs in r["prompts"].items():
        for i, x in enumerate(runs):
            fraction, steady = roofline_fraction(x, r["decode_bytes"])
            probes = "/".join(f"{b / GB:.1f}" for b in x["bandwidth_before_after"])
            rows.append([name, i + 1, x["prompt_tokens"], x["image_tokens"], x["ttft_s"], x["decode_tok_s"], probes,
                         f"{fraction:.2f}" + ("" if steady else " (switched)")])
    print_table(["prompt", "run", "prompt tok", "image tok", "TTFT s", "decode tok/s", "copy GB/s before/after",
                 "roofline frac"], rows)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
