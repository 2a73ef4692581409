"""Load test of `phi4rv serve`: continuous batching vs one request at a time, same model, one run.

Starts the server twice on 127.0.0.1 (``--max-batch B`` and ``--max-batch 1``), drives each with
C concurrent streaming clients sending a mix of text-only and image requests (icon, chart,
photo, screenshot sizes), and reports requests/s, generated tokens/s, p50/p99 time to first
token and latency, and failures. Greedy decoding with a fixed ``max_tokens`` so both runs do the
same work. Both servers stay up; the timed load alternates between them over ``--repeats``
(>= 3) rounds (order reversed every other round), and the ratio is printed on the median and
on the best round of each.

    python bench/serve_load.py --model runs/tiny --clients 16 --requests 1000
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_rates, print_rates

SIZES = [None, (64, 64), (800, 600), (1024, 680), (1280, 720)]  # None = text only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_uri(size: tuple[int, int], seed: int) -> str:
    """A screen/chart-like image: a smooth gradient with flat boxes (pure noise would make JPEG
    decoding, not the server, the thing measured)."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1, (1, 1, 3))
    img = Image.fromarray(np.broadcast_to(ramp, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.rectangle([x, y, x + int(rng.integers(4, w // 3 + 5)), y + int(rng.integers(4, h // 3 + 5))],
                       fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def bodies(n: int, max_tokens: int, shared_prefix: int = 0) -> list[dict]:
    """`n` requests cycling through the image sizes; with `shared_prefix`, every request starts with
    the same system message of about that many words (an application's instructions)."""
    uris = {s: image_uri(s, i) for i, s in enumerate(SIZES) if s}
    system = " ".join(f"rule{k % 97} applies" for k in range(shared_prefix // 2))
    out = []
    for i in range(n):
        size = SIZES[i % len(SIZES)]
        content = [{"type": "text", "text": f"Request {i}: describe what you see."}]
        if size:
            content.insert(0, {"type": "image_url", "image_url": {"url": uris[size]}})
        messages = [{"role": "user", "content": content}]
        if shared_prefix:
            messages.insert(0, {"role": "system", "content": system})
        out.append({"model": "bench", "messages": messages, "max_tokens": max_tokens,
                    "temperature": 0, "reasoning_effort": "none", "stream": True,
                    "stream_options": {"include_usage": True}})
    return out


def start(model: str, max_batch: int, max_queue: int, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "phi4rv", "serve", "--model", model, "--port", str(port), "--served-model-name", "bench",
         "--max-batch", str(max_batch), "--max-queue", str(max_queue), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def one(client: httpx.Client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                return {"ok": False, "status": "stream error"}
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            for c in obj.get("choices", []):
                d = c.get("delta", {})
                if ttft is None and (d.get("content") or d.get("reasoning_content")):
                    ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return {"ok": True, "ttft": ttft if ttft is not None else total, "latency": total, "tokens": tokens}


def run(url: str, work: list[dict], clients: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    it = iter(work)

    def worker():
        with httpx.Client() as client:
            while True:
                with lock:
                    body = next(it, None)
                if body is None:
                    return
                try:
                    res = one(client, url, body)
                except httpx.HTTPError as e:
                    res = {"ok": False, "status": type(e).__name__}
                with lock:
                    results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    return {
        "requests": len(work),
        "completed": len(ok),
        "failed": len(work) - len(ok),
        "lost": len(work) - len(results),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "results": results,
    }


def combine(rounds: list[dict]) -> dict:
    """Rounds of one side: counts summed, rates as the median round (and the best), percentiles
    over every request."""
    ok = [r for rd in rounds for r in rd["results"] if r["ok"]]
    pct = lambda key, q: float(np.percentile([r[key] for r in ok], q)) if ok else float("nan")  # noqa: E731
    rps = [rd["requests_per_s"] for rd in rounds]
    return {
        "requests": sum(rd["requests"] for rd in rounds),
        "completed": sum(rd["completed"] for rd in rounds),
        "failed": sum(rd["failed"] for rd in rounds),
        "lost": sum(rd["lost"] for rd in rounds),
        "wall_s": sum(rd["wall_s"] for rd in rounds),
        "requests_per_s": float(np.median(rps)),
        "requests_per_s_best": max(rps),
        "requests_per_s_rounds": rps,
        "tokens_per_s": float(np.median([rd["tokens_per_s"] for rd in rounds])),
        "ttft_p50_s": pct("ttft", 50),
        "ttft_p99_s": pct("ttft", 99),
        "latency_p50_s": pct("latency", 50),
        "latency_p99_s": pct("latency", 99),
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder (default: a fresh tiny random one)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=1000, help="requests for the batched server")
    p.add_argument("--sequential-requests", type=int, default=None,
                   help="requests for the one-at-a-time server (default: requests/4; throughput is a rate)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds per side (>= 3)")
    p.add_argument("--preset", default="tiny", help="preset of the random model made when --model is not given "
                   "(tiny: 13M parameters; small: 129M)")
    p.add_argument("--shared-prefix", type=int, default=0, metavar="WORDS",
                   help="every request starts with the same system message of about WORDS words; adds a third "
                        "server without the prefix cache, to show its gain")
    p.add_argument("--tiny", action="store_true", help="a few requests, for a smoke test")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.repeats < 3:
        p.error("--repeats must be >= 3")
    if args.tiny:
        args.clients, args.requests, args.max_tokens = 4, 12, 4
    n_seq = args.sequential_requests or max(args.clients, args.requests // 4)
    per_round = {"continuous": max(1, args.requests // args.repeats), "one-at-a-time": max(1, n_seq // args.repeats),
                 "no prefix cache": max(1, args.requests // args.repeats)}
    sides = [("continuous", args.max_batch, ()), ("one-at-a-time", 1, ())]
    if args.shared_prefix:
        sides.append(("no prefix cache", args.max_batch, ("--prefix-cache-mb", "0")))

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / args.preset)
            subprocess.run([sys.executable, "-m", "phi4rv", "init", "--preset", args.preset, "--out", model], check=True,
                           stdout=subprocess.DEVNULL)
        servers = {}
        try:
            for name, max_batch, extra in sides:
                servers[name] = start(model, max_batch, max(args.clients * 2, 64), *extra)
            for name, (_, url) in servers.items():  # warm-up, not reported: every image of the mix once
                run(url, bodies(len(SIZES), args.max_tokens, args.shared_prefix), args.clients)
            rounds: dict[str, list[dict]] = {name: [] for name in servers}
            for rep in range(args.repeats):
                for name in (list(servers) if rep % 2 == 0 else list(servers)[::-1]):
                    work = bodies(per_round[name], args.max_tokens, args.shared_prefix)
                    rounds[name].append(run(servers[name][1], work, args.clients))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    figures = {name: combine(rs) for name, rs in rounds.items()}

    cont, seq = figures["continuous"], figures["one-at-a-time"]
    ratio = cont["requests_per_s"] / seq["requests_per_s"] if seq["requests_per_s"] else float("nan")
    ratio_best = cont["requests_per_s_best"] / seq["requests_per_s_best"] if seq["requests_per_s_best"] else float("nan")
    import torch

    rates = machine_rates(torch.device("cpu"), torch.float32, args.tiny)
    print(f"machine: {machine()}, 1-minute load average {os.getloadavg()[0]:.2f}")
    print_rates(rates)
    print(f"model: {args.model or f'{args.preset} random (phi4rv init --preset {args.preset})'}; {args.clients} clients; "
          f"max_tokens {args.max_tokens}; image mix {[s for s in SIZES]}; shared system prompt {args.shared_prefix} words")
    keys = ["requests", "completed", "failed", "lost", "wall_s", "requests_per_s", "tokens_per_s", "ttft_p50_s",
            "ttft_p99_s", "latency_p50_s", "latency_p99_s"]
    print(f"{'':<16}" + "".join(f"{k:>16}" for k in figures))
    for k in keys:
        print(f"{k:<16}" + "".join(f"{figures[n][k]:>16.3f}" if isinstance(figures[n][k], float) else f"{figures[n][k]:>16}"
                                   for n in figures))
    if "no prefix cache" in figures:
        off = figures["no prefix cache"]
        gain = cont["requests_per_s"] / off["requests_per_s"] if off["requests_per_s"] else float("nan")
        print(f"prefix cache gain (continuous / continuous without it): {gain:.2f}x requests/s; "
              f"ttft p50 {cont['ttft_p50_s']:.3f} s vs {off['ttft_p50_s']:.3f} s")
    print(f"{args.repeats} alternating rounds per side; requests/s and tokens/s are the median round, percentiles over "
          f"every request of every round")
    print(f"throughput ratio (continuous / one-at-a-time): {ratio:.2f}x median, {ratio_best:.2f}x best rounds  "
          f"(target >= 4x at 16 clients: {'met' if ratio >= 4 else 'BELOW TARGET'})")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "machine_rates": rates, "clients": args.clients,
                                         "repeats": args.repeats,
                                         "ratio": ratio, "ratio_best": ratio_best, **figures}, indent=2))


if __name__ == "__main__":
    main()
