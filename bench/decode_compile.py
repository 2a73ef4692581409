"""Decode throughput: eager vs `--compile` (torch.compile of the decode step), same weights.

One random model of a preset's shapes (or a checkpoint folder, `--model`: the 15B fits once, not
twice), its decode step compiled (`phi4rv.generation.compiled`) and not, in turn, on the same
weights; text-only prompts of random ids (the vision tower never runs); greedy, exactly
`--new-tokens` tokens per row (no stop ids), the sides alternating run by run over `--repeats`.
Decode tokens/s = batch x (new_tokens - 1) / the decode time `generate` reports (prefill, eager on
both sides, is excluded). The compile is paid in the warm-up runs, reported apart with the number
of graphs compiled, not in the timed ones.

    python bench/decode_compile.py --preset tiny
    python bench/decode_compile.py --preset small --quantize none int8 --json out/decode_compile.json
    python bench/decode_compile.py --preset small --batch 4 --slot-len 8192   # the server's slots
    python bench/decode_compile.py --model DIR --dtype bfloat16 --quantize w8a8 --batch 1 --new-tokens 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, machine, print_machine, print_table, setup, sync, write_json

from phi4rv.checkpoint import load_model
from phi4rv.config import Phi4RVConfig, preset
from phi4rv.generation.compiled import COMPILE_MODES, compile_decode
from phi4rv.generation.core import Core, GenerationParams, Request, Sequence
from phi4rv.generation.generate import Generation, generate
from phi4rv.model import Phi4RV
from phi4rv.model.quant import quantize_modules
from phi4rv.processing.tokenizer import NUM_REGULAR, Tokenizer, build_phi4_tokenizer

SIDES = ("eager", "compiled")


def build(args, mode: str, device, dtype) -> Phi4RV:
    if args.model is not None:
        return load_model(args.model, dtype=dtype, device=device, quantize=None if mode == "none" else mode)
    torch.manual_seed(args.seed)
    model = Phi4RV(preset(args.preset))
    model.init_weights(std=0.5)  # large weights: peaked distributions, greedy ties unlikely
    model = model.to(device=device, dtype=dtype).eval()
    if mode != "none":
        quantize_modules(model, mode, dtype)
    return model


def in_slots(model: Phi4RV, tok, requests, params: GenerationParams, timing: dict, slot_len: int) -> list[Generation]:
    """`generate` in slots of `slot_len` positions, as the server sizes them (its whole context)."""
    core = Core(model, tok, len(requests), slot_len)
    seqs = [Sequence(r, params, row=i) for i, r in enumerate(requests)]
    out = [Generation() for _ in requests]
    events = core.admit(seqs)
    t0 = time.perf_counter()
    while True:
        for e in events:
            out[e.row].token_ids.append(e.token_id)
        active = [s for s in seqs if not s.finished]
        if not active:
            break
        events = core.step(active)
    sync(model.device)
    timing["decode"] = time.perf_counter() - t0
    return out


def run_pair(model: Phi4RV, compile_mode: str, tok, requests, new_tokens: int, device, warmup: int, repeats: int,
             slot_len: int | None = None) -> dict:
    params = GenerationParams(max_new_tokens=new_tokens)
    b = len(requests)
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    warm: dict[str, list[float]] = {s: [] for s in SIDES}
    graphs = {s: 0 for s in SIDES}
    for i in range(warmup + repeats):
        for side in SIDES:  # alternate: other load on the machine hits both alike
            compile_decode(model, compile_mode if side == "compiled" else None)  # the graphs are kept meanwhile
            timing: dict[str, float] = {}
            before = counters["stats"]["unique_graphs"]
            sync(device)
            t0 = time.perf_counter()
            if slot_len is None:
                out = generate(model, tok, requests, params, timing)
            else:
                out = in_slots(model, tok, requests, params, timing, slot_len)
            sync(device)
            total = time.perf_counter() - t0
            graphs[side] += counters["stats"]["unique_graphs"] - before
            if i < warmup:
                warm[side].append(total)
            else:
                runs[side].append({"decode": timing["decode"], "tokens": [o.token_ids for o in out]})
    res: dict = {"batch": b, "graphs_compiled": graphs}
    steps = b * (new_tokens - 1)
    for side in SIDES:
        decode = [r["decode"] for r in runs[side]]
        res[side] = {"warmup_total_s": warm[side], "decode_s": decode, "decode_median_s": statistics.median(decode),
                     "decode_min_s": min(decode), "decode_tokens_per_s": steps / statistics.median(decode),
                     "decode_tokens_per_s_best": steps / min(decode)}
    res["ratio_median"] = res["eager"]["decode_median_s"] / res["compiled"]["decode_median_s"]
    res["ratio_min"] = res["eager"]["decode_min_s"] / res["compiled"]["decode_min_s"]
    res["tokens_identical"] = all(a["tokens"] == c["tokens"] for a, c in zip(runs["eager"], runs["compiled"]))
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model shapes (tiny: 13M parameters, small: 129M)")
    p.add_argument("--model", type=Path, help="a checkpoint folder instead of a random preset (its weights, tokenizer and --dtype)")
    p.add_argument("--quantize", nargs="+", default=["none"], choices=["none", "int8", "int4", "w8a8"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--slot-len", type=int, help="KV slots of this many positions, as the server sizes them (default: "
                   "prompt + new tokens, as generate does)")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    add_common_args(p, repeats=3, warmup=1)
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.batch, args.prompt_len, args.new_tokens = "tiny", [1, 2], 8, 8
    if args.warmup < 1:
        raise SystemExit("--warmup must be >= 1: the first compiled runs pay the compile")
    device, dtype = setup(args)
    if args.model is not None:
        tok, cfg = Tokenizer.from_dir(args.model), Phi4RVConfig.load(args.model)
    else:
        with tempfile.TemporaryDirectory() as tok_dir:
            build_phi4_tokenizer(tok_dir)
            tok = Tokenizer.from_dir(tok_dir)
        cfg = preset(args.preset)
    info = machine(device, dtype)

    results = []
    g = torch.Generator().manual_seed(args.seed)
    for mode in args.quantize:
        model = build(args, mode, device, dtype)
        for b in args.batch:
            ids = torch.randint(0, min(NUM_REGULAR, cfg.decoder.vocab_size), (b, args.prompt_len), generator=g)
            requests = [Request(input_ids=row.tolist()) for row in ids]
            res = run_pair(model, args.compile_mode, tok, requests, args.new_tokens, device,
                           args.warmup, args.repeats, args.slot_len)
            results.append({"quantize": mode, **res})
            print(f"{mode} batch {b}: compiled / eager = {res['ratio_median']:.2f}x median", file=sys.stderr, flush=True)
        del model
    info["load_avg_1m_after"] = round(os.getloadavg()[0], 2)

    with torch.device("meta"):
        n_params = sum(t.numel() for t in Phi4RV(cfg).decoder.parameters())
    print_machine(info)
    slots = f"slots of {args.slot_len} positions" if args.slot_len else "slots as generate sizes them"
    source = f"checkpoint {args.model}" if args.model else f"preset {args.preset}, random weights"
    print(f"model: {source} (decoder hidden {cfg.decoder.hidden_size}, {cfg.decoder.num_hidden_layers} layers, "
          f"vocab {cfg.decoder.vocab_size}; {n_params / 1e6:.0f}M decoder parameters); prompt {args.prompt_len} random ids, exactly "
          f"{args.new_tokens} new tokens greedy, {slots}; compile mode {args.compile_mode!r}; {args.warmup} warm-up + "
          f"{args.repeats} timed runs per side, alternating")
    rows = []
    for r in results:
        for side in SIDES:
            s = r[side]
            rows.append([f"{r['quantize']} b{r['batch']} {side}", s["decode_median_s"], s["decode_tokens_per_s"],
                         s["decode_tokens_per_s_best"], r["graphs_compiled"][side],
                         ", ".join(f"{t:.3g}" for t in s["warmup_total_s"])])
    print_table(["side", "decode s (median)", "decode tok/s", "best tok/s", "graphs compiled", "warm-up s"], rows)
    print()
    for r in results:
        print(f"{r['quantize']} batch {r['batch']}: compiled / eager decode tok/s = {r['ratio_median']:.2f}x median, "
              f"{r['ratio_min']:.2f}x min times; token ids {'identical' if r['tokens_identical'] else 'DIFFER'}")
    figures = {"benchmark": "decode_compile", "machine": info,
               "config": {"preset": args.preset, "model": str(args.model) if args.model else None, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "slot_len": args.slot_len,
                          "compile_mode": args.compile_mode, "warmup": args.warmup, "repeats": args.repeats,
                          "decoder_parameters": n_params},
               "results": results}
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
