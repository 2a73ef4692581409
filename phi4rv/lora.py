"""LoRA: low-rank adapters on the model's linear layers, merged back for a release-format export.

Ours rather than peft's: our layers are plain `nn.Linear`, and a `LoRALinear` that *is* an
`nn.Linear` (same `weight`/`bias` names, plus `lora_A`/`lora_B`) keeps every parameter name, so the
release name mapping, FSDP2 wrapping and the optimizer see the same model with or without
adapters. peft would wrap the model (renaming every key under `base_model.model.`) and pull in
transformers and accelerate for ~80 lines of arithmetic.

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T      A: [r, in] (Kaiming), B: [out, r] (zeros)

The fused projections (qkv_proj, gate_up_proj) get one adapter each, as in Phi-3 fine-tunes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DECODER_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
VISION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LORA_KEYS = (".lora_A", ".lora_B")


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.scale = rank, alpha / rank
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        if dev.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        a, b = self.lora_A, self.lora_B
        if not torch.is_autocast_enabled(x.device.type):
            a, b = a.to(x.dtype), b.to(x.dtype)
        return y + F.linear(F.linear(self.dropout(x), a), b) * self.scale

    def delta(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the adapter folded into the weight."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight = nn.Parameter((self.weight.float() + self.delta()).to(self.weight.dtype).detach())
        if self.bias is not None:
            out.bias = nn.Parameter(self.bias.detach().clone())
        return out

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, scale={self.scale:g}"


def _targets(model: nn.Module, decoder: tuple[str, ...], vision: tuple[str, ...] | None) -> list[str]:
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, LoRALinear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith("decoder.layers.") and leaf in decoder:
            names.append(name)
        elif vision is not None and name.startswith("vision.encoder.layers.") and leaf in vision:
            if int(name.split(".")[3]) < len(model.vision.encoder.layers) - 1:  # the last is unused
                names.append(name)
    return names


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: tuple[str, ...] | list[str] = DECODER_TARGETS,
    vision_targets: tuple[str, ...] | list[str] | None = None,
) -> list[str]:
    """Replace the targeted linears (decoder layers; vision layers when `vision_targets` is given)
    with LoRALinear in place. Returns the names of the adapted modules."""
    names = _targets(model, tuple(targets), tuple(vision_targets) if vision_targets is not None else None)
    if not names:
        raise ValueError(f"no linear layer matches the LoRA targets {list(targets)}")
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), rank, alpha, dropout))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore plain nn.Linear layers (in place)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALinear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, mod.merged())
    return model


def is_lora_param(name: str) -> bool:
    return name.endswith(LORA_KEYS)


def lora_scales(model: nn.Module) -> dict[str, float]:
    return {name: m.scale for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_state_dict(state: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """A full state dict with adapters (`x.lora_A`, `x.lora_B`) -> the merged one, without touching
    the model (used to export a checkpoint from a model that keeps training, possibly sharded)."""
    out = {k: v for k, v in state.items() if not is_lora_param(k)}
    for module, scale in scales.items():
        w = out[f"{module}.weight"]
        delta = state[f"{module}.lora_B"].float() @ state[f"{module}.lora_A"].float() * scale
        out[f"{module}.weight"] = (w.float() + delta).to(w.dtype)
    return out


def export_merged(model: nn.Module, out: str | Path, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Write a release-format checkpoint of `model` with its adapters merged; the model is unchanged."""
    from phi4rv.checkpoint import save_checkpoint

    view = StateView(model.cfg, merge_state_dict(dict(model.state_dict()), lora_scales(model)))
    return save_checkpoint(view, out, tokenizer=tokenizer, dtype=dtype)


class StateView:
    """Just enough of a Phi4RV (`cfg`, `state_dict()`) for `save_checkpoint` to write a state dict
    that was gathered or merged elsewhere, without building a second model."""

    def __init__(self, cfg, state: dict[str, torch.Tensor]):
        self.cfg = cfg
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state
