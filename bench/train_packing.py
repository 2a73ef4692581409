"""Training throughput: packed batches vs padded batches, same model, same data, one run.

The data is a realistic mix, generated from the seed: 80% direct answers (5-60 tokens), 20%
reasoning answers (150-500 tokens), 0-2 images per sample of random sizes from 64x64 to 1280x720
(NaFlex, the release's 256..3600 patches), a ~110-token system prompt and a short question.

Each side runs one pass over the same samples, a full training step per micro-batch (forward,
loss, backward, AdamW):

- packed (ours): several samples per row of `--max-len` tokens, block-causal attention (one causal
  attention call per packed sample, no [T, T] mask), positions restarting per sample; all images
  packed into one vision sequence.
- padded: `--padded-batch` samples per micro-batch, one per row, padded to the longest (the
  LLaVA / HF Trainer collation that packing replaces); by default as many samples as packing puts
  in a micro-batch on average, so both sides take the same number of steps. Images are packed for
  the vision encoder on every side but the last.
- padded, length-grouped: `--padded-batch` samples per micro-batch as above, but grouped by
  length first (longest first, as HF Trainer's `group_by_length` orders a mega-batch), so each
  micro-batch pads to similar lengths: what users of padded training actually run, and the fair
  baseline for packing.
- padded, token budget: one sample per row, as many rows as fit `rows x longest <= batch_tokens`
  (dynamic batch size, the same budget as packing): a stronger baseline than fixed batches.
- padded + padded images: token-budget padding, and every image padded to max_num_patches in the
  vision encoder as the release's code does (`--sides` to include it).

The LM head runs only where a loss is taken (`logits_at`) on every side.

tokens/s counts real tokens only (image positions included, padding excluded); warm-up
micro-batches are run first and not timed. Each side runs in its own process so that peak
memory is its own (CUDA: max allocated; CPU: how much the peak resident set grew while training,
i.e. activations, gradients and optimizer state on top of interpreter + model + data); the
processes wait while another side runs, and the sides alternate pass by pass over `--repeats` (>= 3) rounds, the order reversed every other round, and
the table shows the median and the best pass of each.

    python bench/train_packing.py                  # ~10 minutes on 2 CPU cores
    python bench/train_packing.py --tiny           # seconds
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

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
from phi4rv.data.dataset import Example
from phi4rv.data.packing import collate, pack_plan, pad_plan
from phi4rv.model import Phi4RV
from phi4rv.processing.image import ImageProcessorConfig, naflex_size
from phi4rv.processing.tokens import IGNORE_INDEX, IMAGE_TOKEN_ID

SIDES = ("packed", "padded", "padded, length-grouped", "padded, token budget", "padded + padded images")
DEFAULT_SIDES = SIDES[:4]
TARGET = 2.0


def model_config(args) -> Phi4RVConfig:
    v = VisionConfig(hidden_size=args.vision_hidden, intermediate_size=2 * args.vision_hidden, num_attention_heads=4,
                     num_hidden_layers=args.vision_layers)
    d = DecoderConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max(8192, args.max_len))
    return Phi4RVConfig(vision=v, decoder=d,
                        min_num_patches=args.min_patches, max_num_patches=args.max_patches)


def make_data(args) -> list[Example]:
    rng = random.Random(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    proc = ImageProcessorConfig(min_num_patches=args.min_patches, max_num_patches=args.max_patches)
    max_w, max_h = (320, 240) if args.tiny else (1280, 720)
    out = []
    for i in range(args.samples):
        n_img = rng.choices([0, 1, 2], weights=[15, 80, 5])[0]
        grids = []
        for _ in range(n_img):
            H, W = naflex_size(rng.randint(64, max_h), rng.randint(64, max_w), proc)
            grids.append((H // 16, W // 16))
        think = rng.random() < 0.2
        answer = rng.randint(150, 500) if think else rng.randint(5, 60)
        prompt = (20 if args.tiny else 110) + rng.randint(8, 60)
        ids = [rng.randrange(args.vocab) for _ in range(prompt)]
        for h, w in grids:
            ids += [IMAGE_TOKEN_ID] * (h * w)
        n_prompt = len(ids)
        ids += [rng.randrange(args.vocab) for _ in range(answer)]
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        pixels = [torch.rand(h * w, 768, generator=g) * 2 - 1 for h, w in grids]
        out.append(Example(str(i), ids, labels[1:] + [IGNORE_INDEX], grids, [], "think" if think else "nothink", pixels))
    return out


def padded_image_features(model: Phi4RV, pixels: torch.Tensor, grids, pad: int) -> torch.Tensor:
    """The vision tower + projector run as the release runs them: each image padded to `pad` patches,
    one batch, padding masked out as attention keys. Returns the real patches' features."""
    vis = model.vision
    lengths = [h * w for h, w in grids]
    n, d = len(grids), vis.cfg.hidden_size
    padded = pixels.new_zeros(n, pad, pixels.shape[1])
    pos = pixels.new_zeros(n, pad, d)
    mask = torch.zeros(n, pad, dtype=torch.bool, device=pixels.device)
    table = vis.embeddings.positions(grids)
    for k, (part, p) in enumerate(zip(pixels.split(lengths), table.split(lengths))):
        padded[k, : len(part)], pos[k, : len(part)], mask[k, : len(part)] = part, p, True
    x = vis.embeddings.patch_embedding(padded) + pos
    heads = vis.cfg.num_attention_heads
    for layer in vis.encoder.layers[:-1]:
        h = layer.layer_norm1(x)
        a = layer.self_attn
        q, k, v = (proj(h).view(n, pad, heads, d // heads).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + a.out_proj(o.transpose(1, 2).reshape(n, pad, d))
        x = x + layer.mlp(layer.layer_norm2(x))
    return model.projector(x[mask])


def measure(side: str, args, commands, queue) -> None:
    """One side in its own process: plan, warm up, then, for each command, time a training step
    per micro-batch (one pass) and report it."""
    device, dtype = setup(args)
    torch.manual_seed(args.seed)
    model = Phi4RV(model_config(args))
    model.init_weights()
    model.to(device)
    if side == "padded + padded images":
        model.encode_images = lambda pixels, grids: padded_image_features(model, pixels, grids, args.max_patches)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    data = make_data(args)
    plan = make_plan(side, [len(e) for e in data], args)
    batches = [collate([[data[i] for i in row] for row in mb]) for mb in plan]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type, enabled=False)

    def step(b) -> None:
        b = b.to(device)
        scored = b.targets != IGNORE_INDEX
        with autocast:
            logits = model(**b.model_inputs(), logits_at=scored)  # the LM head only where a loss is taken
        loss = F.cross_entropy(logits.float(), b.targets[scored])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB: interpreter, model, data
    warm = []
    for b in batches[: args.warmup]:
        t0 = time.perf_counter()
        step(b)
        sync(device)
        warm.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = batches[args.warmup :]
    while commands.get() is not None:
        sync(device)
        t0 = time.perf_counter()
        for b in timed:
            step(b)
        sync(device)
        queue.put(figures(side, args, device, batches, timed, time.perf_counter() - t0, warm, base_rss))


def figures(side, args, device, batches, timed, seconds, warm, base_rss) -> dict:
    real = sum(b.num_tokens for b in timed)
    slots = sum(b.input_ids.numel() for b in timed)
    image_slots = sum(len(b.grids) * args.max_patches if side == "padded + padded images" else b.num_tokens - int(((b.input_ids != IMAGE_TOKEN_ID) & (b.segment_ids > 0)).sum()) for b in timed)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # what training added to the peak resident set, beyond interpreter + model + data
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    return {
        "side": side, "micro_batches": len(batches), "timed_micro_batches": len(timed), "rows": sum(b.input_ids.shape[0] for b in timed),
        "real_tokens": real, "token_slots": slots, "fill": real / slots, "image_patch_slots": image_slots,
        "seconds": seconds, "tokens_per_s": real / seconds, "warmup_s": warm, "peak_mem_mib": peak,
        "peak_mem_kind": "cuda max allocated" if device.type == "cuda" else "peak RSS growth while training",
    }


def make_plan(side: str, lengths: list[int], args):
    if side.startswith("packed"):
        return pack_plan(lengths, args.max_len, args.batch_tokens)
    if side == "padded":
        return [[[i] for i in range(s, min(s + args.padded_batch, len(lengths)))] for s in range(0, len(lengths), args.padded_batch)]
    if side == "padded, length-grouped":
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [[[i] for i in order[s : s + args.padded_batch]] for s in range(0, len(order), args.padded_batch)]
    return pad_plan(lengths, args.batch_tokens)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--max-len", type=int, default=4608, help="row length when packing (longest sample)")
    p.add_argument("--batch-tokens", type=int, default=9216, help="token budget per micro-batch (packed and token-budget sides)")
    p.add_argument("--hidden", type=int, default=256, help="decoder width")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--vision-hidden", type=int, default=64)
    p.add_argument("--vision-layers", type=int, default=3, help="the last one is unused, as in the release")
    p.add_argument("--min-patches", type=int, default=256)
    p.add_argument("--max-patches", type=int, default=3600)
    p.add_argument("--padded-batch", type=int, default=None,
                   help="samples per micro-batch of the padded side (default: packing's average)")
    p.add_argument("--sides", default=";".join(DEFAULT_SIDES), help="';'-separated subset of: " + "; ".join(SIDES))
    add_common_args(p, repeats=3, warmup=1)
    args = p.parse_args(argv)
    if args.tiny:
        args.samples, args.max_len, args.batch_tokens = 12, 1024, 2048
        args.hidden, args.layers, args.vocab, args.vision_hidden, args.vision_layers = 32, 2, 512, 32, 2
        args.min_patches, args.max_patches = 16, 256
    sides = [s.strip() for s in args.sides.split(";")]
    if any(s not in SIDES for s in sides):
        p.error(f"--sides: choose from {', '.join(SIDES)}")
    device, dtype = setup(args)

    data = make_data(args)
    lengths = [len(e) for e in data]
    if max(lengths) > args.max_len:
        p.error(f"the longest sample has {max(lengths)} tokens > --max-len {args.max_len}")
    n_images = sum(len(e.grids) for e in data)
    if args.padded_batch is None:
        args.padded_batch = max(1, round(len(data) / len(pack_plan(lengths, args.max_len, args.batch_tokens))))

    rates = machine_rates(device, dtype, args.tiny)
    ctx = mp.get_context("spawn")
    workers = {}
    for side in sides:  # one process per side (its own peak memory), kept for every pass
        commands, out = ctx.Queue(), ctx.Queue()
        proc = ctx.Process(target=measure, args=(side, args, commands, out))
        proc.start()
        workers[side] = (proc, commands, out)
    passes: dict[str, list[dict]] = {side: [] for side in sides}
    try:
        for rep in range(args.repeats):  # alternate the sides, one pass at a time, the order reversed every other round
            for side in (sides if rep % 2 == 0 else sides[::-1]):
                _, commands, out = workers[side]
                commands.put("pass")
                passes[side].append(out.get())
    finally:
        for proc, commands, _ in workers.values():
            commands.put(None)
            proc.join(timeout=60)
    results = {}
    for side, runs in passes.items():
        tps = [r["tokens_per_s"] for r in runs]
        median = statistics.median(tps)
        results[side] = {**runs[0], "tokens_per_s": median, "tokens_per_s_best": max(tps), "tokens_per_s_runs": tps,
                         "seconds": [r["seconds"] for r in runs],
                         "peak_mem_mib": statistics.median(r["peak_mem_mib"] for r in runs)}

    info = machine(device, dtype)
    print_machine(info)
    print_rates(rates)
    cfg = model_config(args)
    print(f"model: decoder {cfg.decoder.num_hidden_layers} x {cfg.decoder.hidden_size} (vocab {cfg.decoder.vocab_size}), "
          f"vision {cfg.vision.num_hidden_layers} x {cfg.vision.hidden_size}; all parameters train (AdamW)")
    print(f"data: {len(data)} samples, {sum(lengths)} tokens ({min(lengths)}..{max(lengths)} per sample), {n_images} images "
          f"({args.min_patches}..{args.max_patches} patches each); micro-batch budget {args.batch_tokens} tokens, rows of "
          f"{args.max_len} when packed, {args.padded_batch} samples per padded micro-batch; {args.warmup} warm-up "
          f"micro-batch(es) per side not timed\n")
    rows = []
    for side, r in results.items():
        rows.append([side, r["micro_batches"], r["rows"], r["real_tokens"], r["token_slots"], f"{100 * r['fill']:.0f}%",
                     statistics.median(r["seconds"]), r["tokens_per_s"], r["tokens_per_s_best"], r["peak_mem_mib"]])
    print_table(["side", "micro-batches", "rows (timed)", "real tokens", "slots", "fill", "median s", "median tok/s",
                 "best tok/s", f"peak MiB ({results[sides[0]]['peak_mem_kind']})"], rows)
    figures = {"benchmark": "train_packing", "machine": info, "machine_rates": rates,
               "config": {k: v for k, v in vars(args).items() if k != "json"}, "results": results, "target_ratio": TARGET}
    print(f"\n{args.repeats} alternating passes per side; ratios of median tokens/s (of best passes in brackets); "
          f"target >= {TARGET:g}x against every padded side")
    for ours in [s for s in sides if s.startswith("packed")]:
        for side in [s for s in sides if s.startswith("padded")]:
            ratio = results[ours]["tokens_per_s"] / results[side]["tokens_per_s"]
            best = results[ours]["tokens_per_s_best"] / results[side]["tokens_per_s_best"]
            figures.setdefault("ratios", {})[f"{ours} vs {side}"] = ratio
            figures.setdefault("ratios_best", {})[f"{ours} vs {side}"] = best
            mem = results[ours]["peak_mem_mib"] / max(results[side]["peak_mem_mib"], 1e-9)
            print(f"{ours} vs {side}: {ratio:.2f}x tokens/s ({best:.2f}x), {mem:.2f}x peak memory  "
                  f"({'met' if ratio >= TARGET else 'BELOW TARGET'})")
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
