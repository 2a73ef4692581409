"""Greedy decoding: phi4rv's `generate` vs transformers' `Phi3ForCausalLM.generate`, same weights.

A Phi-3-shaped decoder of ~300M parameters with the real tokenizer's vocabulary (100352), GQA
and head dim 128 like Phi-4, random weights; text-only prompts of random ids (no images, so the
VLM's vision tower is a stub and never runs). Both sides produce exactly `--new-tokens` tokens
(greedy, no eos: transformers gets `min_new_tokens` and no eos id, ours no stop ids) and the
token ids are compared. transformers runs its default generate path: dynamic KV cache,
`attn_implementation="sdpa"` (its fastest on CPU), logits for the last position only.

Decode throughput excludes prefill on both sides and counts the `new_tokens - 1` tokens made by
decode steps (the first token comes from the prefill's logits):
  - ours: the `timing` dict `generate` fills in (`prefill`, then `decode` = the step loop);
  - transformers: a streamer that timestamps each token as generate hands it over; decode is
    from the first token (chosen from the prefill's logits) to the last, prefill is from the
    call to the first token (so it also holds generate's set-up).
The two sides run alternately, run by run, so other load on the machine hits both alike.

Roofline (batch 1): every decode step reads all weights once, so tokens/s <= bandwidth / bytes
per token. Bytes per token count `lm_head`, every layer's matrices and norms and the final norm;
the input embedding is a gather of one row per sequence and is not counted, nor are KV-cache
reads (listed apart; tiny next to the weights here). Bandwidth is measured in the same run with a
copy kernel (`common.machine_rates`: 1 GiB copied, bytes read + written per second, best of 5,
STREAM's convention; a `sum()` probe read 27.6 then 39.7 GB/s on one machine, a reduction is not
a stable bandwidth figure), probed before and after the timed runs; the higher of the two sets
the roofline. Figures move with the machine: compare them with the bandwidth printed beside.

    python bench/decode.py                         # batch 1 and 8, fp32 on CPU
    python bench/decode.py --batch 1 --json out/decode.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Phi3Config, Phi3ForCausalLM
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_common_args,
    machine,
    machine_rates,
    print_machine,
    print_rates,
    print_table,
    setup,
    sync,
    write_json,
)

from phi4rv.config import DecoderConfig, Phi4RVConfig, VisionConfig
from phi4rv.generation.generate import GenerationParams, Request, generate
from phi4rv.model import Phi4RV
from phi4rv.processing.tokenizer import NUM_REGULAR, Tokenizer, build_phi4_tokenizer

TARGET_RATIO_B1 = 1.5
TARGET_ROOFLINE = 0.60


def build_models(cfg: DecoderConfig, device, dtype, seed: int) -> tuple[Phi3ForCausalLM, Phi4RV]:
    torch.manual_seed(seed)
    hf = Phi3ForCausalLM(
        Phi3Config(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
            original_max_position_embeddings=cfg.max_position_embeddings,
            rope_theta=cfg.rope_theta,
            partial_rotary_factor=cfg.partial_rotary_factor,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=None,
            attn_implementation="sdpa",
        )
    ).eval()
    with torch.no_grad():  # HF inits RMSNorm weights to ones; randomise them
        for n, p in hf.named_parameters():
            if n.endswith("layernorm.weight") or n == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    # Our VLM with a stub vision tower (no images in these prompts) around the same decoder weights.
    stub = VisionConfig(hidden_size=32, intermediate_size=32, num_attention_heads=1, num_hidden_layers=1)
    ours = Phi4RV(Phi4RVConfig(vision=stub, decoder=cfg)).eval()
    ours.decoder.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()}, strict=True)
    return hf.to(device, dtype), ours.to(device, dtype)


def weight_bytes_per_token(ours: Phi4RV) -> int:
    """Bytes of the decoder weights a decode step reads: lm_head, layers, final norm (not embed_tokens)."""
    return sum(p.numel() * p.element_size() for n, p in ours.decoder.named_parameters() if not n.startswith("embed_tokens"))


class StepClock(BaseStreamer):
    """A streamer that only timestamps: transformers' generate calls `put` once with the prompt
    before prefill and then once per new token, right after the token is chosen."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_pair(hf, ours, tok, prompts: torch.Tensor, new_tokens: int, device, warmup: int, repeats: int) -> dict:
    """Time both sides on the same prompts, alternating ours / transformers run by run so that
    other load on the machine hits both alike."""
    b = prompts.shape[0]
    requests = [Request(input_ids=row.tolist()) for row in prompts]
    params = GenerationParams(max_new_tokens=new_tokens)
    ids = prompts.to(device)
    attn = torch.ones_like(ids)

    def ours_once() -> dict:
        timing: dict[str, float] = {}
        sync(device)
        t0 = time.perf_counter()
        out = generate(ours, tok, requests, params, timing)
        sync(device)
        return {"total": time.perf_counter() - t0, "prefill": timing["prefill"], "decode": timing["decode"],
                "tokens": [g.token_ids for g in out]}

    @torch.inference_mode()
    def hf_once() -> dict:
        clock = StepClock()
        sync(device)
        t0 = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, streamer=clock)
        sync(device)
        total = time.perf_counter() - t0
        # stamps[1]: first token chosen (end of prefill); stamps[-1]: last token chosen.
        return {"total": total, "prefill": clock.stamps[1] - t0, "decode": clock.stamps[-1] - clock.stamps[1],
                "tokens": out[:, ids.shape[1]:].tolist()}

    runs: dict[str, list[dict]] = {"ours": [], "transformers": []}
    warm: dict[str, list[float]] = {"ours": [], "transformers": []}
    for i in range(warmup + repeats):
        for side, fn in (("ours", ours_once), ("transformers", hf_once)):
            r = fn()
            (warm[side].append(r["total"]) if i < warmup else runs[side].append(r))

    res: dict = {"batch": b, "prompt_len": prompts.shape[1], "new_tokens": new_tokens}
    steps = new_tokens - 1  # decode steps; the first token comes from prefill
    for side in ("ours", "transformers"):
        rs = runs[side]
        r = {"warmup_s": warm[side], "total_s": [x["total"] for x in rs], "prefill_s": [x["prefill"] for x in rs],
             "decode_s": [x["decode"] for x in rs]}
        r["prefill_median_s"] = _median(r["prefill_s"])
        r["decode_median_s"] = _median(r["decode_s"])
        r["decode_tokens_per_s"] = b * steps / r["decode_median_s"]
        r["decode_tokens_per_s_best"] = b * steps / min(r["decode_s"])
        r["end_to_end_tokens_per_s"] = b * new_tokens / _median(r["total_s"])
        res[side] = r
    res["ratio"] = res["ours"]["decode_tokens_per_s"] / res["transformers"]["decode_tokens_per_s"]
    res["ratio_best"] = res["ours"]["decode_tokens_per_s_best"] / res["transformers"]["decode_tokens_per_s_best"]
    ours_tokens, hf_tokens = runs["ours"][-1]["tokens"], runs["transformers"][-1]["tokens"]
    same = [a == h for a, h in zip(ours_tokens, hf_tokens)]
    res["tokens_identical"] = all(same)
    res["rows_identical"] = sum(same)
    res["first_mismatch"] = [next((i for i, (x, y) in enumerate(zip(a, h)) if x != y), None)
                             for a, h in zip(ours_tokens, hf_tokens)]
    res["lengths"] = sorted({len(t) for t in ours_tokens} | {len(t) for t in hf_tokens})
    return res


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=100352)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer folder (default: build one in a temp dir)")
    add_common_args(p, repeats=3, warmup=1)
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 64, 128, 2, 4, 2
        args.batch, args.prompt_len, args.new_tokens = [1, 2], 8, 8
        args.warmup = min(args.warmup, 1)
    device, dtype = setup(args)
    cfg = DecoderConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                        max_position_embeddings=4096)

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = args.tokenizer
        if tok_dir is None:
            tok_dir = Path(tmp)
            build_phi4_tokenizer(tok_dir)
        tok = Tokenizer.from_dir(tok_dir)

    hf, ours = build_models(cfg, device, dtype, args.seed)
    n_params = sum(p.numel() for p in ours.decoder.parameters())
    wbytes = weight_bytes_per_token(ours)
    elt = torch.finfo(dtype).bits // 8
    kv_bytes = lambda ctx: 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * ctx * elt  # noqa: E731
    rates_before = machine_rates(device, dtype, args.tiny)
    info = machine(device, dtype)

    g = torch.Generator().manual_seed(args.seed)
    results = []
    for b in args.batch:
        prompts = torch.randint(0, min(NUM_REGULAR, cfg.vocab_size), (b, args.prompt_len), generator=g)  # no special ids
        results.append(run_pair(hf, ours, tok, prompts, args.new_tokens, device, args.warmup, args.repeats))

    info["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    # Probed before and after the runs; the higher figure is the roofline (the stricter one).
    rates_after = machine_rates(device, dtype, args.tiny)
    bw_before, bw_after = (r["copy_bandwidth_bytes_per_s"] for r in (rates_before, rates_after))
    bw = max(bw_before, bw_after)
    rates = max(rates_before, rates_after, key=lambda r: r["copy_bandwidth_bytes_per_s"])
    b1 = next((r for r in results if r["batch"] == 1), None)
    roofline = bw / wbytes  # tokens/s at batch 1 if only the weight reads cost time
    frac = b1["ours"]["decode_tokens_per_s"] / roofline if b1 else None
    frac_hf = b1["transformers"]["decode_tokens_per_s"] / roofline if b1 else None

    print_machine(info)
    print_rates(rates)
    print(f"decoder: hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, layers {cfg.num_hidden_layers}, "
          f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} kv (head dim {cfg.head_dim}), vocab {cfg.vocab_size}; "
          f"{n_params / 1e6:.1f}M parameters")
    print(f"greedy, prompt {args.prompt_len} random ids, exactly {args.new_tokens} new tokens; transformers: sdpa, "
          f"dynamic cache; decode tokens/s = batch x {args.new_tokens - 1} decode steps / decode time")
    rows = []
    for r in results:
        for side in ("ours", "transformers"):
            s = r[side]
            rows.append([f"{side} b{r['batch']}", s["prefill_median_s"] * 1e3, s["decode_median_s"],
                         s["decode_tokens_per_s"], s["decode_tokens_per_s_best"], s["end_to_end_tokens_per_s"],
                         ", ".join(f"{t:.3g}" for t in s["warmup_s"])])
    print_table(["side", "prefill ms", "decode s", "decode tok/s", "best tok/s", "end-to-end tok/s", "warm-up s"], rows)
    print()
    for r in results:
        target = f"  (target >= {TARGET_RATIO_B1:g}x: {'met' if r['ratio'] >= TARGET_RATIO_B1 else 'missed'})" if r["batch"] == 1 else ""
        match = ("identical" if r["tokens_identical"] else
                 f"DIFFER in {r['batch'] - r['rows_identical']} of {r['batch']} rows (first mismatch at {r['first_mismatch']})")
        print(f"batch {r['batch']}: ours / transformers decode tokens/s = {r['ratio']:.2f}x (best times: {r['ratio_best']:.2f}x)"
              f"{target}; token ids {match}; lengths {r['lengths']}")
    print(f"\nroofline: weights read per token {wbytes / 1e6:.1f} MB (lm_head + layers + norms, {elt}-byte {info['dtype']}; "
          f"embed_tokens excluded; KV cache adds {kv_bytes(args.prompt_len + args.new_tokens) / 1e6:.2f} MB at the last step, "
          f"not counted); memory bandwidth {bw / 1e9:.1f} GB/s (copy kernel, read + write, best of 5 over "
          f"{rates['copy_bytes'] / 2**20:.0f} MiB; "
          f"{bw_before / 1e9:.1f} before the runs, {bw_after / 1e9:.1f} after) "
          f"-> {roofline:.1f} tokens/s at batch 1")
    if b1:
        print(f"batch 1 decode at {frac:.0%} of roofline ours, {frac_hf:.0%} transformers "
              f"(target >= {TARGET_ROOFLINE:.0%}: {'met' if frac >= TARGET_ROOFLINE else 'missed'}); "
              f"achieved {b1['ours']['decode_tokens_per_s'] * wbytes / 1e9:.1f} GB/s")

    figures = {
        "benchmark": "decode",
        "machine": info,
        "config": {"hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size, "layers": cfg.num_hidden_layers,
                   "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size,
                   "parameters": n_params, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                   "warmup": args.warmup, "repeats": args.repeats, "reference_attention": "sdpa", "tiny": args.tiny},
        "results": results,
        "weight_bytes_per_token": wbytes,
        "bandwidth_bytes_per_s": bw,
        "bandwidth_bytes_per_s_before_after": [bw_before, bw_after],
        "bandwidth_method": "copy kernel, bytes read + written / time, best of 5; the higher of before/after",
        "machine_rates": rates,
        "roofline_tokens_per_s": roofline,
        "roofline_fraction": frac,
        "roofline_fraction_transformers": frac_hf,
        "target_ratio_batch1": TARGET_RATIO_B1,
        "target_roofline_fraction": TARGET_ROOFLINE,
    }
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
