"""Soak test of `phi4rv serve` on 127.0.0.1: steady mixed load (text, images, a shared system
prompt, a few streamed, structured and cancelled requests) for `--minutes`, bounded in requests;
samples the server's resident memory and reports its drift after warm-up, and every request's
fate (lost requests and 5xx must be 0).

    python bench/serve_soak.py --minutes 10 --clients 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import bodies, machine, start


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def prefix_cache_bytes(url: str) -> int:
    """The server's `phi4rv_prefix_cache_bytes` gauge (what the prefix cache holds, within its budget)."""
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("phi4rv_prefix_cache_bytes "):
            return int(float(line.split()[1]))
    return 0


def request_kinds(i: int, body: dict) -> dict:
    """Vary the load: every 5th non-streaming, every 7th structured (JSON schema)."""
    body = dict(body)
    if i % 5 == 0:
        body["stream"] = False
        body.pop("stream_options", None)
    if i % 7 == 0:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "r", "schema": {
            "type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}}}
    return body


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-requests", type=int, default=20000, help="bound on the number of requests")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--warmup-fraction", type=float, default=0.2, help="share of the time before RSS is a baseline")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / args.preset)
            subprocess.run([sys.executable, "-m", "phi4rv", "init", "--preset", args.preset, "--out", model],
                           check=True, stdout=subprocess.DEVNULL)
        proc, url = start(model, 8, 64)
        work = bodies(64, args.max_tokens, shared_prefix=200)
        statuses: dict[str, int] = {}
        lock = threading.Lock()
        sent = [0]
        deadline = time.monotonic() + args.minutes * 60
        samples: list[tuple[float, int, int]] = []  # (seconds, server RSS, prefix cache bytes)

        def client_loop():
            with httpx.Client(timeout=120) as c:
                while time.monotonic() < deadline:
                    with lock:
                        if sent[0] >= args.max_requests:
                            return
                        i = sent[0]
                        sent[0] += 1
                    body = request_kinds(i, work[i % len(work)])
                    try:
                        if body.get("stream"):
                            with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                                code = str(r.status_code)
                                for n, _ in enumerate(r.iter_lines()):
                                    if i % 11 == 0 and n == 2:  # a client that leaves mid-stream
                                        code = "cancelled"
                                        break
                        else:
                            code = str(c.post(url + "/v1/chat/completions", json=body).status_code)
                    except httpx.HTTPError as e:
                        code = f"lost ({type(e).__name__})"
                    with lock:
                        statuses[code] = statuses.get(code, 0) + 1

        threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            samples.append((time.monotonic() - t0, rss_bytes(proc.pid), prefix_cache_bytes(url)))
            time.sleep(2)
        for t in threads:
            t.join()
        health = httpx.get(url + "/health").json()
        proc.terminate()
        proc.wait(timeout=60)

    elapsed = samples[-1][0] if samples else 0.0
    after = [(r, c) for t, r, c in samples if t >= args.warmup_fraction * elapsed]
    (base, base_cache), (end, end_cache), peak = after[0], after[-1], max(r for r, _ in after)
    drift = (end - base) / base
    # The prefix cache grows by design up to its budget: RSS without it is the leak test.
    drift_rest = ((end - end_cache) - (base - base_cache)) / (base - base_cache)
    total = sum(statuses.values())
    fivexx = sum(n for code, n in statuses.items() if code.startswith("5"))
    lost = sum(n for code, n in statuses.items() if code.startswith("lost"))
    print(f"machine: {machine()}, 1-minute load average {os.getloadavg()[0]:.2f}")
    print(f"{total} requests in {elapsed / 60:.1f} min from {args.clients} clients: {statuses}")
    print(f"server RSS after warm-up {base / 2**20:.0f} MiB -> end {end / 2**20:.0f} MiB "
          f"(drift {drift * 100:+.1f}%, peak {peak / 2**20:.0f} MiB); "
          f"{'flat within 5%' if abs(drift) <= 0.05 else 'NOT flat within 5%'}")
    print(f"prefix cache {base_cache / 2**20:.0f} MiB -> {end_cache / 2**20:.0f} MiB; RSS less the prefix cache: "
          f"drift {drift_rest * 100:+.1f}%")
    print(f"lost {lost}, 5xx {fivexx}; health at the end: {health}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "statuses": statuses, "rss_samples": samples,
                                         "drift": drift, "drift_without_prefix_cache": drift_rest, "lost": lost, "5xx": fivexx}, indent=2))


if __name__ == "__main__":
    main()
