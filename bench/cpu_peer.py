"""The CPU peer, side by side: phi4rv `--quantize int8` / `w8a8` / `int4` vs llama.cpp Q8_0 / Q4_0, greedy decode.

A random decoder of Phi-4's real widths (hidden 5120, 40 heads, 10 KV heads, head dim 128,
intermediate 17920, vocab 100352) at reduced depth (`--layers`, default 2: the 40-layer model in
both formats does not fit one process on a 24 GB machine) is written by phi4rv as a bf16 checkpoint
in the release layout (`init_checkpoint`). llama.cpp's own converter turns the folder into a bf16
GGUF and llama.cpp's own quantizer (`llama_model_quantize`, what `llama-quantize` runs) makes Q8_0
and Q4_0 from it, so both sides quantize the same bf16 values. phi4rv loads the checkpoint with
`load_model(quantize=...)` in `--dtype` (default bfloat16, as the release is stored).

What each side quantizes, as its users get it:
- phi4rv int8: every block linear int8 per output row, weight-only (bf16 activations); w8a8: the
  same weights, each token's activations quantized to int8 per row and an integer matmul; int4:
  block linears int4 (asymmetric, groups of 128), weight-only; the LM head int8 with int8
  activations under every mode (`phi4rv/model/quant.py`); embeddings in bf16.
- llama.cpp Q8_0: everything 8-bit in blocks of 32, activations quantized to 8 bits in blocks of
  32 for the dot products (so w8a8 is the like-for-like side; int8 is compared to it too); Q4_0: block linears and token embedding 4-bit
  in blocks of 32, output.weight Q6_K (llama.cpp's default for the output under Q4_0;
  `--q4-output q8_0` makes it Q8_0, phi4rv's choice, so both read the same LM head bits).

Both sides, in this one process, greedily decode exactly `--new-tokens` tokens from the same
`--prompt-tokens` random ids, with the same number of threads (`--threads`, default 2) and
OMP_WAIT_POLICY=PASSIVE; every round runs all five sides, the order flipped each round, `--warmup`
rounds dropped, `--repeats` rounds timed. Reported per side: decode tokens/s (first token excluded:
it comes from the prefill's logits) median and best, prefill tokens/s median and best, the bytes
read per decode step (every weight as stored, but the token embedding, a one-row gather; the KV
cache is not counted: at prompt 64 + 32 new tokens and 2 layers it is < 1 MB) and decode as a
fraction of the bandwidth roofline (bytes per token x tokens/s / the copy kernel's bandwidth,
read + write, probed right before and right after each run; runs whose probes disagree are left
out, see `common.probe_bandwidth`). The ratio
phi4rv / llama.cpp at equal bits (int8 and w8a8 vs Q8_0, int4 vs Q4_0) on median and on best times, and
whether the goal (>= 1.0x, issue 16) is met. Greedy agreement (common prefix) is printed for
information only: the two quantizers round differently, so random weights need not agree.

    python bench/cpu_peer.py --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp --converter-path /tmp/convert-env
    python bench/cpu_peer.py ... --tiny          # small widths, a smoke run (seconds)

Setup of llama-cpp-python and the converter's transformers 4 environment: `interop_llamacpp.py`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # why: llamacpp_common's docstring
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # phi4rv's side as the phi4rv command runs it (phi4rv/cli.py)

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    STRADDLE,
    add_common_args,
    machine,
    machine_rates,
    peak_rss_mib,
    print_machine,
    print_rates,
    print_table,
    probe_bandwidth,
    probed_fraction,
    setup,
    write_json,
)
from llamacpp_common import (
    LlamaSide,
    add_llamacpp_args,
    agreement,
    check_llamacpp,
    convert,
    gguf_field,
    gguf_tensor_bytes,
    mid_config,
    phi4rv_greedy,
    quantize,
)

from phi4rv.checkpoint import estimate_load_bytes, init_checkpoint, load_model
from phi4rv.config import Phi4RVConfig, preset
from phi4rv.processing.tokenizer import NUM_REGULAR, Tokenizer, build_phi4_tokenizer

GOAL_RATIO = 1.0  # issue 16: phi4rv >= 1.0x llama.cpp at equal bits
PAIRS = {"int8": "Q8_0", "w8a8": "Q8_0", "int4": "Q4_0"}  # phi4rv mode -> llama.cpp type at the same bits
GB = 1e9


def peer_config(tiny: bool, layers: int) -> Phi4RVConfig:
    if tiny:
        cfg = mid_config(tiny=True)
    else:
        cfg = preset("phi4rv-15b")  # the release's widths; only the depth is reduced
    cfg.decoder.num_hidden_layers = layers
    return cfg


def mem_available() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))


def phi4rv_bytes_per_token(model) -> int:
    """Decoder weights as stored after quantization, but the embedding table (a one-row gather)."""
    named = [*model.decoder.named_parameters(), *model.decoder.named_buffers()]
    return sum(t.numel() * t.element_size() for n, t in named if not n.startswith("embed_tokens"))


def llama_bytes_per_token(tensors: dict[str, tuple[str, int]]) -> int:
    return sum(nbytes for name, (_, nbytes) in tensors.items() if name != "token_embd.weight")


def type_summary(tensors: dict[str, tuple[str, int]]) -> str:
    """e.g. 'blk Q4_0, output Q6_K, token_embd Q4_0' (the 2-d weights' types)."""
    blk = sorted({t for n, (t, _) in tensors.items() if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n})
    return f"blocks {'/'.join(blk)}, output {tensors['output.weight'][0]}, token_embd {tensors['token_embd.weight'][0]}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_llamacpp_args(p)
    p.add_argument("--layers", type=int, default=2, help="decoder layers at the real widths (the release has 40)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--q4-output", choices=["llama", "q8_0"], default="llama",
                   help="llama.cpp Q4_0's output.weight: its default (Q6_K) or Q8_0 (phi4rv int4's LM head bits)")
    p.add_argument("--modes", default=",".join(PAIRS), help="phi4rv's sides, of " + ", ".join(PAIRS) +
                   " (fewer sides leave room for more --layers)")
    p.add_argument("--out", type=Path, default=None, help="keep the checkpoint and GGUF files here (default: temporary)")
    add_common_args(p, repeats=3, warmup=1)
    p.set_defaults(device="cpu", dtype="bfloat16", threads=2)
    args = p.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("cpu_peer compares CPU decoding: --device must be cpu")
    if args.tiny:
        args.prompt_tokens, args.new_tokens = min(args.prompt_tokens, 16), min(args.new_tokens, 8)
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2 (decode speed counts the tokens after the first)")
    unknown = set(args.modes.split(",")) - set(PAIRS)
    if unknown:
        raise SystemExit(f"unknown --modes {', '.join(sorted(unknown))}; choose from {', '.join(PAIRS)}")
    pairs = {mode: t for mode, t in PAIRS.items() if mode in args.modes.split(",")}
    device, dtype = setup(args)
    llama_cpp = check_llamacpp(args.llama_cpp)
    cfg = peer_config(args.tiny, args.layers)
    dcfg = cfg.decoder

    # What this run will hold: both phi4rv models, both GGUF files (memory-mapped), the checkpoint's page cache aside.
    ours_need = sum(estimate_load_bytes(cfg, dtype, q) for q in pairs)
    # Q8_0 is 34 bytes per 32 weights, Q4_0 18: of the decoder's parameters (a bound; Q4_0's output is <= 8.5 bits)
    n_dec = dcfg.vocab_size * dcfg.hidden_size * 2 + dcfg.num_hidden_layers * (
        dcfg.hidden_size * (dcfg.num_attention_heads + 2 * dcfg.num_key_value_heads) * dcfg.head_dim
        + dcfg.num_attention_heads * dcfg.head_dim * dcfg.hidden_size + 3 * dcfg.hidden_size * dcfg.intermediate_size)
    need = ours_need + n_dec * 34 * len(set(pairs.values())) // 32 + int(1.5 * GB)
    free = mem_available()
    if need > free:
        raise SystemExit(f"not enough memory: this run holds ~{need / GB:.1f} GB, {free / GB:.1f} GB available; "
                         f"use fewer --layers")

    rates_before = machine_rates(device, dtype, args.tiny)
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    root = Path(tmp.name) if tmp else args.out
    root.mkdir(parents=True, exist_ok=True)
    ckpt = root / "phi4rv-peer"

    # 1. phi4rv writes the random bf16 checkpoint (release layout, bounded memory).
    with tempfile.TemporaryDirectory() as tok_dir:
        build_phi4_tokenizer(tok_dir, model_max_length=cfg.max_length)
        tok = Tokenizer.from_dir(tok_dir)
    shutil.rmtree(ckpt, ignore_errors=True)
    t0 = time.perf_counter()
    init_checkpoint(cfg, ckpt, torch.bfloat16, seed=args.seed, tokenizer=tok)
    write_s = time.perf_counter() - t0

    # 2. llama.cpp: converter to bf16 (lossless from the bf16 save), then its quantizer.
    bf16_gguf = root / "peer-bf16.gguf"
    convert_s, _ = convert(args.llama_cpp, args.converter_path, ckpt, bf16_gguf, "bf16")
    pre = gguf_field(bf16_gguf, "tokenizer.ggml.pre")
    ggufs, quantize_s = {}, {}
    out_type = {"Q8_0": None, "Q4_0": None if args.q4_output == "llama" else llama_cpp.GGML_TYPE_Q8_0}
    ftypes = {name: ftype for name, ftype in {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
                                               "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}.items() if name in pairs.values()}
    for name, ftype in ftypes.items():
        ggufs[name] = root / f"peer-{name.lower()}.gguf"
        quantize_s[name] = quantize(bf16_gguf, ggufs[name], ftype, args.threads, out_type[name])
    bf16_gguf.unlink()
    tensors = {name: gguf_tensor_bytes(path) for name, path in ggufs.items()}

    # 3. The sides, the same prompt ids.
    rng = np.random.default_rng(args.seed)
    prompt = [int(x) for x in rng.integers(0, NUM_REGULAR, args.prompt_tokens)]
    n = args.new_tokens
    sides: dict[str, object] = {}
    bytes_per_token: dict[str, int] = {}
    load_s: dict[str, float] = {}
    for mode, gguf_type in pairs.items():
        t0 = time.perf_counter()
        model = load_model(ckpt, dtype=dtype, quantize=mode)
        load_s[f"phi4rv {mode}"] = time.perf_counter() - t0
        sides[f"phi4rv {mode}"] = model
        bytes_per_token[f"phi4rv {mode}"] = phi4rv_bytes_per_token(model)
        if f"llama.cpp {gguf_type}" in sides:
            continue
        t0 = time.perf_counter()
        sides[f"llama.cpp {gguf_type}"] = LlamaSide(ggufs[gguf_type], args.threads, args.prompt_tokens + n + 8, logits_all=False)
        load_s[f"llama.cpp {gguf_type}"] = time.perf_counter() - t0
        bytes_per_token[f"llama.cpp {gguf_type}"] = llama_bytes_per_token(tensors[gguf_type])

    def run(name: str) -> dict:
        side = sides[name]
        return side.greedy(prompt, n) if isinstance(side, LlamaSide) else phi4rv_greedy(side, tok, prompt, n)

    order = list(sides)
    runs: dict[str, list[dict]] = {k: [] for k in order}
    warm: dict[str, list[float]] = {k: [] for k in order}
    for i in range(args.warmup + args.repeats):
        for name in order if i % 2 == 0 else order[::-1]:  # alternating, the order flipped each round
            before = probe_bandwidth(args.tiny, device)
            r = run(name)
            r["bandwidth_before_after"] = [before, probe_bandwidth(args.tiny, device)]
            if i < args.warmup:
                warm[name].append(r["prefill_s"] + r["decode_s"])
            else:
                runs[name].append(r)
    peak = peak_rss_mib() / 1024  # before the closing bandwidth probe's 2 GiB
    rates_after = machine_rates(device, dtype, args.tiny)
    rates = max(rates_before, rates_after, key=lambda r: r["copy_bandwidth_bytes_per_s"])

    figures: dict[str, dict] = {}
    for name, rs in runs.items():
        decode = [(n - 1) / r["decode_s"] for r in rs]
        prefill = [args.prompt_tokens / r["prefill_s"] for r in rs]
        fractions = [probed_fraction(d * bytes_per_token[name], *r["bandwidth_before_after"]) for d, r in zip(decode, rs)]
        steady = [f for f, agree in fractions if agree]
        figures[name] = {
            "decode_tok_s_median": statistics.median(decode), "decode_tok_s_best": max(decode),
            "prefill_tok_s_median": statistics.median(prefill), "prefill_tok_s_best": max(prefill),
            "decode_s": [r["decode_s"] for r in rs], "prefill_s": [r["prefill_s"] for r in rs], "warmup_s": warm[name],
            "bytes_per_token": bytes_per_token[name],
            "bandwidth_before_after": [r["bandwidth_before_after"] for r in rs],
            "roofline_fractions": [f for f, _ in fractions], "steady_runs": len(steady),
            "roofline_fraction_median": statistics.median(steady) if steady else None,
            "load_s": load_s[name], "tokens": rs[-1]["tokens"],
            "same_every_run": all(r["tokens"] == rs[0]["tokens"] for r in rs),
        }
    comparisons = {}
    for mode, gguf_type in pairs.items():
        ours, theirs = figures[f"phi4rv {mode}"], figures[f"llama.cpp {gguf_type}"]
        comparisons[mode] = {
            "llama_type": gguf_type,
            "decode_ratio_median": ours["decode_tok_s_median"] / theirs["decode_tok_s_median"],
            "decode_ratio_best": ours["decode_tok_s_best"] / theirs["decode_tok_s_best"],
            "prefill_ratio_median": ours["prefill_tok_s_median"] / theirs["prefill_tok_s_median"],
            "greedy_agree": agreement(ours["tokens"], theirs["tokens"]),
        }
        comparisons[mode]["goal_met"] = comparisons[mode]["decode_ratio_median"] >= GOAL_RATIO

    info = machine(device, dtype)
    info["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    info["omp_wait_policy"] = os.environ["OMP_WAIT_POLICY"]
    info["llama_cpp_python"] = llama_cpp.__version__
    print_machine(info)
    print_rates(rates)
    print(f"decoder: hidden {dcfg.hidden_size}, intermediate {dcfg.intermediate_size}, {dcfg.num_hidden_layers} layers "
          f"(the release has 40), heads {dcfg.num_attention_heads}/{dcfg.num_key_value_heads} kv (head dim {dcfg.head_dim}), "
          f"vocab {dcfg.vocab_size}; random bf16 checkpoint written in {write_s:.1f} s; phi4rv computes in "
          f"{info['dtype']}, llama.cpp in f32 with an f16 KV cache (its defaults)")
    print(f"llama.cpp: converter -> bf16 GGUF {convert_s:.1f} s (tokenizer.ggml.pre = {pre!r}), quantizer "
          + ", ".join(f"{k} {s:.1f} s ({type_summary(tensors[k])})" for k, s in quantize_s.items()))
    print(f"greedy, prompt {args.prompt_tokens} random ids, exactly {n} new tokens, {args.threads} threads each side; "
          f"{args.warmup} warm-up + {args.repeats} timed rounds, all sides each round, order flipped every round")
    rows = []
    for name, f in figures.items():
        frac = f["roofline_fraction_median"]
        rows.append([name, f["bytes_per_token"] / 1e6, f["prefill_tok_s_median"], f["prefill_tok_s_best"],
                     f["decode_tok_s_median"], f["decode_tok_s_best"], "-" if frac is None else f"{frac:.2f}",
                     f"{f['steady_runs']}/{len(f['decode_s'])}", ", ".join(f"{t:.3g}" for t in f["warmup_s"])])
    print_table(["side", "MB read/token", "prefill tok/s med", "best", "decode tok/s med", "best", "roofline frac",
                 "steady runs", "warm-up s"], rows)
    print(f"roofline fraction: bytes read per token (all weights as stored but the token embedding; KV cache not "
          f"counted) x decode tokens/s / the copy kernel's bandwidth probed right before and after each run ({16 if args.tiny else 256} MiB "
          f"a side, read + write), median over the runs whose two probes agree within {STRADDLE:g}x (steady runs); "
          f"{rates_before['copy_bandwidth_bytes_per_s'] / GB:.1f} GB/s before all runs, "
          f"{rates_after['copy_bandwidth_bytes_per_s'] / GB:.1f} after")
    print()
    for mode, c in comparisons.items():
        print(f"{mode} vs {c['llama_type']}: phi4rv / llama.cpp decode tokens/s = {c['decode_ratio_median']:.2f}x median "
              f"({c['decode_ratio_best']:.2f}x on best times), prefill {c['prefill_ratio_median']:.2f}x; "
              f"goal >= {GOAL_RATIO:g}x: {'met' if c['goal_met'] else 'MISSED'}; "
              f"greedy tokens agree for {c['greedy_agree']}/{n} (information: the quantizers round differently)")
    print(f"peak RSS of this process (all sides loaded; taken before the closing bandwidth probe): {peak:.2f} GiB")
    result = {"benchmark": "cpu_peer", "machine": info, "machine_rates": rates,
              "bandwidth_bytes_per_s_before_after": [rates_before["copy_bandwidth_bytes_per_s"],
                                                     rates_after["copy_bandwidth_bytes_per_s"]],
              "config": {"hidden": dcfg.hidden_size, "intermediate": dcfg.intermediate_size, "layers": dcfg.num_hidden_layers,
                         "heads": dcfg.num_attention_heads, "kv_heads": dcfg.num_key_value_heads, "vocab": dcfg.vocab_size,
                         "prompt_tokens": args.prompt_tokens, "new_tokens": n, "threads": args.threads,
                         "warmup": args.warmup, "repeats": args.repeats, "q4_output": args.q4_output, "tiny": args.tiny},
              "figures": figures, "comparisons": comparisons, "gguf_types": {k: type_summary(v) for k, v in tensors.items()},
              "conversion_s": convert_s, "quantize_s": quantize_s, "write_s": write_s, "pre_tokenizer": pre,
              "peak_rss_gib": peak}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
