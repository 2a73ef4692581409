"""fp32 linears on CPU: `F.linear` (PyTorch's default, MKL) vs `phi4rv.model.linear.linear` (oneDNN).

Inference shapes of phi4rv's models, fp32, no autograd: the LM head and the widest layer matrix of
the tiny preset (13M), the small preset (129M), `bench/decode.py`'s 296M decoder and the 15B's
widths, at decode's 1, 4 and 16 rows and a 256-row prefill. Both sides take the same inputs and
weights, alternate run by run (`--repeats`), and their outputs are compared against a float64
product (max |error|, both sides). Ratio = F.linear time / oneDNN time (> 1: oneDNN faster), on
medians and on best times.

    python bench/linear_backend.py                  # ~30 s on 2 cores, ~1 GB
    python bench/linear_backend.py --tiny           # seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

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

from phi4rv.model.linear import linear

SHAPES = [  # name, in, out
    ("tiny lm_head", 64, 100352),
    ("small lm_head", 512, 100352),
    ("small gate_up", 512, 3072),
    ("296M lm_head", 1024, 100352),
    ("296M gate_up", 1024, 5632),
    ("15B down", 17920, 5120),
]
TINY_SHAPES = [("tiny lm_head", 64, 100352), ("small gate_up", 512, 3072)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, repeats=7, warmup=2)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 256])
    args = p.parse_args()
    device, dtype = setup(args)
    if device.type != "cpu" or dtype != torch.float32:
        raise SystemExit("this benchmark compares CPU fp32 backends: run it with --device cpu --dtype float32")
    info = machine(device, dtype)
    rates = machine_rates(device, dtype, args.tiny)
    g = torch.Generator().manual_seed(args.seed)
    rows, figures = [], []
    with torch.no_grad():
        for name, d_in, d_out in TINY_SHAPES if args.tiny else SHAPES:
            w = torch.randn(d_out, d_in, generator=g) * d_in**-0.5
            for m in args.rows:
                x = torch.randn(m, d_in, generator=g)
                ref = x.double() @ w.double().t()
                r = bench({"F.linear": lambda: F.linear(x, w), "oneDNN": lambda: linear(x, w)}, device,
                          args.warmup, args.repeats)
                err = {k: (v["out"].double() - ref).abs().max().item() for k, v in r.items()}
                a, b = r["F.linear"], r["oneDNN"]
                rows.append([name, f"{d_in}x{d_out}", m, a["median_s"] * 1e3, b["median_s"] * 1e3,
                             a["median_s"] / b["median_s"], a["best_s"] / b["best_s"], err["F.linear"], err["oneDNN"]])
                figures.append({"shape": name, "in": d_in, "out": d_out, "rows": m, "err": err,
                                "ratio_median": a["median_s"] / b["median_s"], "ratio_best": a["best_s"] / b["best_s"],
                                **{k: {kk: vv for kk, vv in v.items() if kk != "out"} for k, v in r.items()}})
    print_machine(info)
    print_rates(rates)
    print(f"fp32, no autograd; {args.repeats} alternating runs per side after {args.warmup} warm-up runs")
    print_table(["shape", "in x out", "rows", "F.linear ms", "oneDNN ms", "ratio (median)", "ratio (best)",
                 "max err F.linear", "max err oneDNN"], rows)
    write_json(args.json, {"machine": info, "machine_rates": rates, "results": figures})


if __name__ == "__main__":
    main()
