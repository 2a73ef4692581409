"""w8a8 linears on CPU: `torch._int_mm` on a plain int8 weight vs oneDNN's prepacked weight.

`--quantize w8a8` (and the LM head under every mode) multiplies each token's int8 activations by
int8 weights. Two ways to do it on CPU: `torch._int_mm` on the [out, in] int8 weight as stored, or
the weight prepacked once into oneDNN's blocked layout (`onednn.qlinear_prepack`) and multiplied by
`onednn.qlinear_pointwise`, which phi4rv uses. Both sides are `phi4rv.model.quant.Int8Linear`
layers holding the same quantized weight (one built with packing turned off), bf16 activations as
the 15B runs, at the 15B's layer shapes and decode's 1, 4 and 16 rows and a 64-row prefill. They
alternate run by run (`--repeats`); their outputs must be equal bit for bit. Ratio = `_int_mm` time
/ prepacked time (> 1: prepacked faster); "GB/s" is the prepacked side's weight bytes per second.

    python bench/int8_backend.py                    # ~1 min on 2 cores, ~1.5 GB
    python bench/int8_backend.py --tiny             # seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_common_args,
    bench,
    machine,
    machine_rates,
    print_machine,
    print_rates,
    print_table,
    setup,
    write_json,
)

from phi4rv.model import quant
from phi4rv.model.quant import Int8Linear

SHAPES = [  # name, in, out: the 15B's decoder
    ("qkv", 5120, 7168),
    ("o", 5120, 5120),
    ("gate_up", 5120, 35840),
    ("down", 17920, 5120),
    ("lm_head", 5120, 100352),
]
TINY_SHAPES = [("tiny lm_head", 64, 2048), ("tiny gate_up", 64, 512)]


def layer(w: torch.Tensor, prepack: bool) -> Int8Linear:
    before, quant._ONEDNN_QLINEAR = quant._ONEDNN_QLINEAR, prepack and quant._ONEDNN_QLINEAR
    try:
        lin = Int8Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16, dynamic_activations=True)
        lin.set_weight(w, "cpu")
    finally:
        quant._ONEDNN_QLINEAR = before
    if lin.prepacked != prepack:
        raise SystemExit("oneDNN's qlinear ops are not available in this torch build")
    return lin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, repeats=7, warmup=2)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    p.set_defaults(dtype="bfloat16")
    args = p.parse_args()
    device, dtype = setup(args)
    if device.type != "cpu":
        raise SystemExit("this benchmark compares CPU int8 kernels: run it with --device cpu")
    info = machine(device, dtype)
    rates = machine_rates(device, dtype, args.tiny)
    g = torch.Generator().manual_seed(args.seed)
    rows, figures = [], []
    with torch.no_grad():
        for name, d_in, d_out in TINY_SHAPES if args.tiny else SHAPES:
            w = torch.randn(d_out, d_in, generator=g) * d_in**-0.5
            plain, packed = layer(w, prepack=False), layer(w, prepack=True)
            del w
            for m in args.rows:
                x = torch.randn(m, d_in, generator=g).to(torch.bfloat16)
                r = bench({"_int_mm": lambda: plain(x), "prepacked": lambda: packed(x)}, device, args.warmup, args.repeats)
                a, b = r["_int_mm"], r["prepacked"]
                equal = torch.equal(a["out"], b["out"])
                gbs = d_in * d_out / b["median_s"] / 1e9
                rows.append([name, f"{d_in}x{d_out}", m, a["median_s"] * 1e3, b["median_s"] * 1e3,
                             a["median_s"] / b["median_s"], a["best_s"] / b["best_s"], gbs, equal])
                figures.append({"shape": name, "in": d_in, "out": d_out, "rows": m, "equal": equal,
                                "ratio_median": a["median_s"] / b["median_s"], "ratio_best": a["best_s"] / b["best_s"],
                                "prepacked_weight_gb_s": gbs,
                                **{k: {kk: vv for kk, vv in v.items() if kk != "out"} for k, v in r.items()}})
    print_machine(info)
    print_rates(rates)
    print(f"bf16 activations quantized per row, int8 weights, no autograd; {args.repeats} alternating runs per "
          f"side after {args.warmup} warm-up runs")
    print_table(["shape", "in x out", "rows", "_int_mm ms", "prepacked ms", "ratio (median)", "ratio (best)",
                 "prepacked GB/s", "equal"], rows)
    write_json(args.json, {"machine": info, "machine_rates": rates, "results": figures})
    if not all(f["equal"] for f in figures):
        raise SystemExit("the two kernels gave different outputs")


if __name__ == "__main__":
    main()
