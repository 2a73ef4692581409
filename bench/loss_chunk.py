"""LM-head loss: chunked cross-entropy (phi4rv.train.loss) vs the full logits, at the 15B's widths.

Both sides take the same hidden states [tokens, 5120] and LM head [100352, 5120] (trainable), and
run forward + backward of the summed token loss:

- full: `F.cross_entropy(F.linear(h, W).float(), targets)`, as the loop did before: the logits in
  the compute dtype, their float32 copy, the saved log-softmax and the backward's [tokens, vocab]
  gradients all live at once;
- chunked: `chunked_cross_entropy(h, W, targets, chunk)`: one chunk's logits at a time.

Memory: each side runs in its own process and reports how much its peak resident set grew over
one forward + backward, above what the weights and the inputs already took (the head's gradient,
made by the backward, is counted on both sides)
(CUDA: max allocated). Time: both sides alternate in one process, `--repeats` times.

    python bench/loss_chunk.py                      # ~1 minute on 2 CPU cores, ~5 GB peak
    python bench/loss_chunk.py --tokens 4096        # the saving grows with the tokens
    python bench/loss_chunk.py --tiny               # seconds
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_common_args,
    bench,
    machine,
    peak_rss_mib,
    print_machine,
    print_table,
    reset_peak_rss,
    rss_mib,
    setup,
    sync,
    write_json,
)

from phi4rv.train.loss import chunked_cross_entropy

SIDES = ("full", "chunked")


def inputs(args, device, dtype):
    g = torch.Generator().manual_seed(args.seed)
    h = torch.empty(args.tokens, args.hidden, dtype=dtype).normal_(generator=g).to(device).requires_grad_()
    w = torch.empty(args.vocab, args.hidden, dtype=dtype).normal_(0.0, 0.02, generator=g).to(device).requires_grad_()
    t = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)
    return h, w, t


def step(side: str, h, w, t, chunk: int) -> float:
    if side == "full":
        loss = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
    else:
        loss, _ = chunked_cross_entropy(h, w, t, chunk)
    loss.backward()
    return float(loss.detach())


def measure_memory(side: str, args, queue) -> None:
    """One side in its own process: peak growth of one forward + backward over weights + inputs."""
    device, dtype = setup(args)
    h, w, t = inputs(args, device, dtype)
    # no .grad buffers yet (as under FSDP, where each backward's unsharded gradients are new):
    # the head's [vocab, hidden] gradient is made by the backward on both sides and counted
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        reset_peak_rss()
        base = rss_mib()
    loss = step(side, h, w, t, args.chunk)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()
    queue.put({"side": side, "peak_growth_mib": peak - base, "base_mib": base, "loss": loss,
               "kind": "cuda max allocated" if device.type == "cuda" else "peak RSS growth"})


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="scored tokens in the micro-batch")
    p.add_argument("--hidden", type=int, default=5120)
    p.add_argument("--vocab", type=int, default=100352)
    p.add_argument("--chunk", type=int, default=256, help="tokens per chunk (the loop's loss_chunk_tokens)")
    add_common_args(p, repeats=3, warmup=1)
    p.set_defaults(dtype="bfloat16")
    args = p.parse_args(argv)
    if args.tiny:
        args.tokens, args.hidden, args.vocab, args.chunk = 128, 64, 2048, 32
    device, dtype = setup(args)

    ctx = mp.get_context("spawn")
    memory = {}
    for side in SIDES:
        q = ctx.Queue()
        proc = ctx.Process(target=measure_memory, args=(side, args, q))
        proc.start()
        memory[side] = q.get()
        proc.join()

    h, w, t = inputs(args, device, dtype)

    def run(side):
        def fn():
            h.grad = w.grad = None
            return step(side, h, w, t, args.chunk)
        return fn

    timing = bench({s: run(s) for s in SIDES}, device, args.warmup, args.repeats)
    info = machine(device, dtype)
    print_machine(info)
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"LM head {args.vocab} x {args.hidden} ({str(dtype).removeprefix('torch.')}, trainable), {args.tokens} scored tokens, "
          f"chunks of {args.chunk}; float32 logits would be {logits_mib:,.0f} MiB\n")
    rows = [[s, memory[s]["peak_growth_mib"], timing[s]["median_s"], timing[s]["best_s"], memory[s]["loss"]] for s in SIDES]
    print_table(["side", f"peak MiB ({memory['full']['kind']})", "median s", "best s", "loss"], rows)
    mem_ratio = memory["full"]["peak_growth_mib"] / max(memory["chunked"]["peak_growth_mib"], 1e-9)
    ratios = [f / c for f, c in zip(timing["full"]["times_s"], timing["chunked"]["times_s"])]
    print(f"\nchunked vs full: {mem_ratio:.1f}x less peak memory "
          f"({memory['full']['peak_growth_mib'] - memory['chunked']['peak_growth_mib']:,.0f} MiB saved); "
          f"time ratio full/chunked min {min(ratios):.2f} median {statistics.median(ratios):.2f}; "
          f"|loss difference| {abs(memory['full']['loss'] - memory['chunked']['loss']):.3g}")
    figures = {
        "benchmark": "loss_chunk", "machine": info, "config": {k: v for k, v in vars(args).items() if k != "json"},
        "memory": memory, "timing": {s: {k: v for k, v in r.items() if k != "out"} for s, r in timing.items()},
        "memory_ratio": mem_ratio, "time_ratio_median": statistics.median(ratios), "logits_fp32_mib": logits_mib,
    }
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
