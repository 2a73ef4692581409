"""What quantization costs in quality: bf16, int8, w8a8 and int4 against fp32 on a trained model.

    python bench/quant_quality.py                      # trains the toy (about a minute), then measures
    python bench/quant_quality.py --json out/quant.json

The toy is the recipe's decoder size (width 128, 4 layers, vocabulary 512) trained to continue
arithmetic sequences with 10% of the tokens replaced by noise: most next tokens are certain, the
noisy ones are not, as in real text. It is saved as an fp32 checkpoint and loaded back through
`load_model` as fp32 (the reference), bf16, and `--quantize int8|int4|w8a8` in bf16 (how the 15B
runs) and in fp32 (int8, int4: the weights' share of the drift alone; w8a8 quantizes each linear's
input to int8 either way, and its output comes back in the compute dtype). On held-out
sequences, teacher-forced: per-token KL(fp32 || variant) (mean, p99, max), mean |logprob drift| of
the true token, top-1 agreement with fp32, held-out next-token accuracy; then greedy continuations
of 16 prompts (24 tokens) identical to fp32's. One process, the same weights for every variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, print_table

from phi4rv.checkpoint import load_model, save_checkpoint
from phi4rv.config import preset
from phi4rv.model import Phi4RV
from phi4rv.train.loss import mean_loss

VARIANTS = {  # name: (dtype, quantize)
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "int8 (bf16 act)": ("bfloat16", "int8"),
    "int4 (bf16 act)": ("bfloat16", "int4"),
    "w8a8 (bf16)": ("bfloat16", "w8a8"),
    "int8 (fp32 act)": ("float32", "int8"),
    "w8a8 (fp32)": ("float32", "w8a8"),
    "int4 (fp32 act)": ("float32", "int4"),
}


def sequences(n: int, t: int, g: torch.Generator, noise: float = 0.1) -> torch.Tensor:
    start = torch.randint(0, 500, (n, 1), generator=g)
    step = torch.randint(1, 6, (n, 1), generator=g)
    ids = (start + step * torch.arange(t)) % 512
    mask = torch.rand(n, t, generator=g) < noise
    mask[:, :2] = False
    return torch.where(mask, torch.randint(0, 512, (n, t), generator=g), ids)


def train_toy(steps: int, seed: int) -> Phi4RV:
    torch.manual_seed(seed)
    cfg = preset("tiny")
    cfg.decoder.vocab_size = 512
    cfg.decoder.hidden_size = 128
    cfg.decoder.intermediate_size = 384
    cfg.decoder.num_hidden_layers = 4
    model = Phi4RV(cfg)
    model.init_weights()
    opt = torch.optim.AdamW(model.decoder.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = sequences(32, 32, g)
        loss = mean_loss(model, ids, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    print(f"toy trained: {steps} steps, final loss {loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, n: int) -> torch.Tensor:
    ids = prompts
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1]:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="20 training steps, 16 held-out sequences (a smoke test)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.tiny:
        args.steps = min(args.steps, 20)
    torch.set_num_threads(args.threads)
    print(f"machine: cpu={cpu_model()}, torch={torch.__version__}, threads={torch.get_num_threads()}")
    t0 = time.perf_counter()
    model = train_toy(args.steps, args.seed)
    held = sequences(16 if args.tiny else 128, 32, torch.Generator().manual_seed(10_000 + args.seed))
    prompts = held[:16, :3]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_checkpoint(model, Path(tmp) / "toy")
        ref = load_model(folder, dtype="float32")
        with torch.no_grad():
            lp_ref = ref(held)[:, 1:-1].float().log_softmax(-1)  # positions 2.. are predictable
        target = held[:, 2:]
        ref_greedy = greedy(ref, prompts, 24)
        for name, (dtype, quantize) in VARIANTS.items():
            m = load_model(folder, dtype=dtype, quantize=quantize)
            with torch.no_grad():
                lp = m(held)[:, 1:-1].float().log_softmax(-1)
            kl = F.kl_div(lp, lp_ref, log_target=True, reduction="none").sum(-1).flatten()
            drift = (lp.gather(-1, target[..., None]) - lp_ref.gather(-1, target[..., None])).abs()
            weights = sum(t.numel() * t.element_size() for t in [*m.decoder.parameters(), *m.decoder.buffers()])
            results[name] = {
                "kl_mean": kl.mean().item(), "kl_p99": kl.quantile(0.99).item(), "kl_max": kl.max().item(),
                "logprob_drift": drift.mean().item(),
                "top1_agreement": (lp.argmax(-1) == lp_ref.argmax(-1)).float().mean().item(),
                "accuracy": (lp.argmax(-1) == target).float().mean().item(),
                "greedy_identical": (greedy(m, prompts, 24) == ref_greedy).all(-1).float().mean().item(),
                "decoder_bytes": weights,
            }
    rows = [[k, r["decoder_bytes"] / 2**20, r["kl_mean"], r["kl_p99"], r["kl_max"], r["logprob_drift"],
             r["top1_agreement"], r["accuracy"], r["greedy_identical"]] for k, r in results.items()]
    print_table(["variant", "decoder MiB", "KL mean", "KL p99", "KL max", "|dlogp|", "top-1 = fp32", "held-out acc",
                 "greedy = fp32"], rows)
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
