"""A stage as a value: which parts of the model train, at which learning rate, on what schedule.

Parts: `vision` (the SigLIP-2 tower), `projector`, `decoder` (embeddings, layers, norm, LM head) and
`lora` (every adapter, wherever `apply_lora` put them). A part not listed in the stage's `train`
mapping is frozen. Trainable parameters are kept in float32 even when the model was loaded in a
lower precision; weight decay applies to matrices only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from phi4rv.lora import is_lora_param
from phi4rv.model.quant import QuantLinear
from phi4rv.train.config import PARTS, StageConfig


def part_of(name: str) -> str:
    if is_lora_param(name):
        return "lora"
    return name.split(".", 1)[0]  # vision | projector | decoder


def unused_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The vision tower's last layer and post-layernorm: kept for the release's weight names, never
    in the forward pass (features come from the second-to-last layer), so never trained."""
    last = len(model.vision.encoder.layers) - 1
    return (f"vision.encoder.layers.{last}.", "vision.post_layernorm.")


def freeze_for_stage(model: nn.Module, stage: StageConfig) -> None:
    unused = unused_prefixes(model)
    for name, p in model.named_parameters():
        p.requires_grad_(part_of(name) in stage.train and not name.startswith(unused))
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def parameter_table(model: nn.Module, stage: StageConfig) -> list[tuple[str, str, int, float | None]]:
    """(part, "trains" | "frozen", parameter count, lr) per part, counting the parameters the
    forward pass uses (a quantized base's weights, buffers, as their in x out weights)."""
    counts: dict[str, int] = {}
    unused = unused_prefixes(model)
    for name, p in model.named_parameters():
        if not name.startswith(unused):
            counts[part_of(name)] = counts.get(part_of(name), 0) + p.numel()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and not name.startswith(unused):
            counts[part_of(name)] = counts.get(part_of(name), 0) + m.in_features * m.out_features
    order = sorted(counts, key=lambda part: PARTS.index(part) if part in PARTS else len(PARTS))
    return [(part, "trains" if part in stage.train else "frozen", counts[part], stage.train.get(part)) for part in order]


def format_table(rows: list[tuple[str, str, int, float | None]]) -> str:
    lines = [f"  {part:<10} {state:<7} {n:>14,} params" + (f"  lr {lr:g}" if lr else "") for part, state, n, lr in rows]
    trains = sum(n for _, s, n, _ in rows if s == "trains")
    total = sum(n for *_, n, _ in rows)
    lines.append(f"  {'total':<10} {'':<7} {total:>14,} params, {trains:,} trainable ({100 * trains / max(total, 1):.2f}%)")
    return "\n".join(lines)


def param_groups(model: nn.Module, stage: StageConfig) -> list[dict]:
    """One optimizer group per (part, decayed or not), each with the part's peak lr."""
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = part_of(name)
        decay = stage.weight_decay > 0 and p.ndim >= 2
        g = groups.setdefault(
            (part, decay),
            {"params": [], "lr": stage.train[part], "peak_lr": stage.train[part],
             "weight_decay": stage.weight_decay if decay else 0.0, "part": part},
        )
        g["params"].append(p)
    return list(groups.values())


def lr_factor(step: int, total: int, stage: StageConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if stage.warmup_steps and step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    if stage.schedule == "constant":
        return 1.0
    span = max(total - stage.warmup_steps, 1)
    progress = min(max(step - stage.warmup_steps, 0) / span, 1.0)
    lo = stage.min_lr_ratio
    if stage.schedule == "linear":
        return lo + (1 - lo) * (1 - progress)
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, stage: StageConfig) -> torch.optim.AdamW:
    groups = param_groups(model, stage)
    if not groups:
        raise ValueError("the stage has no trainable parameters")
    # foreach=False: the same per-tensor arithmetic on plain and sharded (DTensor) parameters
    return torch.optim.AdamW(groups, betas=tuple(stage.betas), eps=stage.eps, foreach=False)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["peak_lr"] * factor
