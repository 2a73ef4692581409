"""Shared pieces of the benchmarks: common flags, machine description, synced timing, output.

Every benchmark runs both sides in one process on the same weights, reports warm-up runs apart
from the timed runs, synchronises the device around each timing and prints the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


MIN_REPEATS = 3  # every comparison alternates its sides over at least this many timed runs


def add_common_args(p: argparse.ArgumentParser, repeats: int = 3, warmup: int = 1) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=max(repeats, MIN_REPEATS),
                   help=f"timed runs per side, alternating the sides (>= {MIN_REPEATS}; median and min reported)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed warm-up runs per side (reported apart)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    p.add_argument("--tiny", action="store_true", help="tiny sizes that run in a few seconds (smoke test)")


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    if args.repeats < MIN_REPEATS:
        raise SystemExit(f"--repeats must be >= {MIN_REPEATS} (one timing per side says nothing about noise)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)
    return device, dtype


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine skews timings
    except OSError:
        pass
    return info


def machine_rates(device: torch.device, dtype: torch.dtype, tiny: bool = False) -> dict[str, float]:
    """What this machine can do right now, measured beside the figures it explains:

    - `copy_bandwidth_bytes_per_s`: a STREAM-style copy kernel (`dst.copy_(src)`, 1 GiB each side;
      64 MiB with `tiny`), best of 5, counting bytes read + bytes written — far larger than any
      cache, and unlike a reduction it is memory-bound on every backend;
    - `read_bandwidth_bytes_per_s`: the bytes read alone in that copy (half the above);
    - `matmul_flops_per_s`: a square matmul of `dtype` (2048, 512 with `tiny`), best of 5.
    """
    nbytes = (64 if tiny else 1024) * 2**20
    copy = copy_bandwidth(nbytes, device)
    m = 512 if tiny else 2048
    a = torch.rand(m, m, device=device, dtype=dtype)
    b = torch.rand(m, m, device=device, dtype=dtype)
    a @ b
    best_mm = min(timed(lambda: a @ b, device)[0] for _ in range(5))
    return {"copy_bandwidth_bytes_per_s": copy, "read_bandwidth_bytes_per_s": copy / 2,
            "matmul_flops_per_s": 2 * m**3 / best_mm, "copy_bytes": nbytes, "matmul_size": m}


def copy_bandwidth(nbytes: int, device: torch.device) -> float:
    """Bytes read + written per second by `dst.copy_(src)` of `nbytes` a side, best of 5."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # untimed: the first copy faults the destination's pages in
    return 2 * nbytes / min(timed(lambda: dst.copy_(src), device)[0] for _ in range(5))


def probe_bandwidth(tiny: bool = False, device: torch.device = torch.device("cpu")) -> float:
    """`copy_bandwidth` at 256 MiB a side (16 MiB with --tiny): short enough to run right before
    and right after each timed run. This machine's bandwidth switches between levels (~43 and ~78
    GB/s) from one minute to the next, so a probe minutes away from a run says little about it."""
    return copy_bandwidth((16 if tiny else 256) * 2**20, device)


STRADDLE = 1.15  # probes before / after a run further apart than this: the bandwidth switched during it


def probed_fraction(bytes_per_s: float, before: float, after: float) -> tuple[float, bool]:
    """(bytes read per second / the mean of the probes beside the run, whether the probes agree)."""
    return bytes_per_s / ((before + after) / 2), max(before, after) <= STRADDLE * min(before, after)


def print_rates(rates: dict[str, float]) -> None:
    print(f"machine rates: copy bandwidth {rates['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (read + write; "
          f"{rates['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s read), matmul "
          f"{rates['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s ({rates['matmul_size']}^3)")


def stats(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def bench(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Run each of `fns` warmup + repeats times, alternating between them run by run so that other
    load on the machine hits every side alike; returns per side the timings and the last output."""
    warm: dict[str, list[float]] = {k: [] for k in fns}
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict[str, Any] = {}
    for i in range(warmup + repeats):
        for k, fn in fns.items():
            dt, outs[k] = timed(fn, device)
            (warm if i < warmup else times)[k].append(dt)
    return {
        k: {"warmup_s": warm[k], "times_s": times[k], "median_s": statistics.median(times[k]),
            "best_s": min(times[k]), "out": outs[k]}
        for k in fns
    }


def print_machine(info: dict[str, Any]) -> None:
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def write_json(path: Path | None, figures: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {path}")


def reset_peak_rss() -> None:
    """Reset this process's peak resident set (Linux VmHWM) to its current size, so that a later
    `peak_rss_mib()` measures the peak of what runs in between, not of what came before."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    """This process's peak resident set since start or the last `reset_peak_rss()` (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmRSS in /proc/self/status")
