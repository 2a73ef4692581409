"""LoRA: low-rank adapters on the model's linear layers, merged back for a release-format export.

Ours rather than peft's: our layers are plain `nn.Linear`, and a `LoRALinear` that *is* an
`nn.Linear` (same `weight`/`bias` names, plus `lora_A`/`lora_B`) keeps every parameter name, so the
release name mapping, FSDP2 wrapping and the optimizer see the same model with or without
adapters. peft would wrap the model (renaming every key under `base_model.model.`) and pull in
transformers and accelerate for ~80 lines of arithmetic.

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T      A: [r, in] (Kaiming), B: [out, r] (zeros)

The fused projections (qkv_proj, gate_up_proj) get one adapter each, as in Phi-3 fine-tunes.

QLoRA (`model.quantize` in a training config): the targets are weight-only quantized layers
(`phi4rv.model.quant`) and each gets a `QLoRALinear`, y = base_q(x) + scale * B(A(dropout(x))), the
base frozen and quantized, gradients reaching the input through `quant.WeightOnlyMatmul`. Merging
(`merge_lora`, `export_merged`, the training exports) folds the delta into the DEQUANTIZED base:
the adapters were trained against the quantized weights, so that is the model they correct, as in
QLoRA (Dettmers et al. 2023); the export is a plain dense release checkpoint in the compute dtype
(or the one asked for).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from phi4rv.model.linear import Linear, linear
from phi4rv.model.quant import QuantLinear

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
        y = linear(x, self.weight, self.bias)  # the base's product as `Linear` computes it (oneDNN for fp32 inference)
        a, b = self.lora_A, self.lora_B
        if not torch.is_autocast_enabled(x.device.type):
            a, b = a.to(x.dtype), b.to(x.dtype)
        return y + F.linear(F.linear(self.dropout(x), a), b) * self.scale

    def delta(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def merged(self) -> Linear:
        """A plain `Linear` with the adapter folded into the weight."""
        out = Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight = nn.Parameter((self.weight.float() + self.delta()).to(self.weight.dtype).detach())
        if self.bias is not None:
            out.bias = nn.Parameter(self.bias.detach().clone())
        return out

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, scale={self.scale:g}"


class QLoRALinear(nn.Module):
    """A LoRA adapter on a frozen quantized linear (`base`: Int8Linear or Int4Linear). The adapter's
    parameters keep LoRALinear's names (`lora_A`, `lora_B`), so checkpoints of trained parameters
    read the same."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale = rank, alpha / rank
        dev = next(base.buffers()).device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        if dev.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a, b = self.lora_A, self.lora_B
        if not torch.is_autocast_enabled(x.device.type):
            a, b = a.to(x.dtype), b.to(x.dtype)
        return y + (F.linear(F.linear(self.dropout(x), a), b) * self.scale).to(y.dtype)

    def delta(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def merged(self, dtype: torch.dtype | None = None) -> Linear:
        """A plain `Linear`: the dequantized base plus the adapter's delta, in `dtype` (default:
        the base's compute dtype)."""
        dtype = dtype or self.base.compute_dtype
        out = Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight = nn.Parameter((self.base.dequantized().float() + self.delta()).to(dtype).detach())
        if self.bias is not None:
            out.bias = nn.Parameter(self.bias.detach().to(dtype).clone())
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


Adapted = (LoRALinear, QLoRALinear)


def _targets(model: nn.Module, decoder: tuple[str, ...], vision: tuple[str, ...] | None) -> list[str]:
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, *QuantLinear)) or isinstance(mod, Adapted) or name.endswith(".base"):
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
    with LoRALinear (QLoRALinear on a quantized layer) in place. Returns the adapted modules' names."""
    names = _targets(model, tuple(targets), tuple(vision_targets) if vision_targets is not None else None)
    if not names:
        raise ValueError(f"no linear layer matches the LoRA targets {list(targets)}")
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        base = getattr(owner, leaf)
        adapter = QLoRALinear if isinstance(base, QuantLinear) else LoRALinear
        setattr(owner, leaf, adapter(base, rank, alpha, dropout))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore plain nn.Linear layers (in place); a
    QLoRA adapter is folded into its dequantized base."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Adapted):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, mod.merged())
    return model


def is_lora_param(name: str) -> bool:
    return name.endswith(LORA_KEYS)


def lora_scales(model: nn.Module) -> dict[str, float]:
    return {name: m.scale for name, m in model.named_modules() if isinstance(m, Adapted)}


def dense_names(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """The model's state dict as a dense model's (release names apply): each quantized linear's
    buffers become one `weight` entry (a meta tensor of its shape in the compute dtype, to be
    filled by `module.dequantized()`, one at a time), a QLoRA base's `.base.` level is dropped.
    Returns (state, {weight name: quantized module})."""
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    state, owners = {}, {}
    for key, t in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        dense = module.removesuffix(".base") if module.endswith(".base") and module in quantized else module
        if module in quantized:
            m = quantized[module]
            if leaf in ("qweight", "packed"):
                state[f"{dense}.weight"] = torch.empty(m.out_features, m.in_features, dtype=m.compute_dtype, device="meta")
                owners[f"{dense}.weight"] = m
                continue
            if leaf != "bias":
                continue  # scales, scales_and_zeros: folded into the weight
        state[f"{dense}.{leaf}"] = t
    return state, owners


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`dense_names` with every quantized weight dequantized (all at once: for small models and
    `export_merged`)."""
    state, owners = dense_names(model)
    return {k: owners[k].dequantized() if k in owners else v for k, v in state.items()}


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

    view = StateView(model.cfg, merge_state_dict(dense_state_dict(model), lora_scales(model)))
    return save_checkpoint(view, out, tokenizer=tokenizer, dtype=dtype)


class StateView:
    """Just enough of a Phi4RV (`cfg`, `state_dict()`) for `save_checkpoint` to write a state dict
    that was gathered or merged elsewhere, without building a second model."""

    def __init__(self, cfg, state: dict[str, torch.Tensor]):
        self.cfg = cfg
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state
