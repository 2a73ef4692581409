"""The memory plan: bytes per process of a training stage, from the config alone (no weights read).

Parameters are counted on a meta-device model (exact names, shapes, LoRA adapters); the rest is
arithmetic over how the loop runs (train.loop, train.distributed, train.loss):

- parameters: frozen ones in `model.dtype`, trained ones in float32; with N processes FSDP2 keeps
  1/N of each (ZeRO-3). A quantized base (`model.quantize`, QLoRA) holds the decoder layers'
  weights as buffers: int8 ~1 byte per weight (+ a scale per row), int4 ~0.53 (half a byte + a
  scale and a zero per group of 128 in the compute dtype), whole on every process (FSDP2 shards
  parameters, not buffers); the backward rebuilds one block of a weight at a time (<= 32 MB).
- gathered: with N > 1 a unit's parameters are all-gathered (in the bf16 compute dtype under
  `precision: bfloat16`) while it runs: the root (projector, vision embeddings, norms) for the
  whole step, plus the two largest other units (layers, token embeddings, LM head: the running one
  and the prefetched one), plus one flat all-gather buffer of the largest unit (FSDP2 gathers into it,
  then copies out). With
  one process under bf16 autocast: the bf16 copies of float32 weights that matmuls keep for the
  backward.
- gradients: float32, 1/N each, plus with N > 1 the unsharded compute-dtype gradients of the root
  and one layer before their reduce-scatter.
- optimizer: AdamW's two float32 moments, 1/N each.
- activations: per decoder layer and token, the tensors autograd keeps (input, norms, q/k/v, rotated
  q/k, attention output, MLP input, gate/up, SiLU, product: 8 x hidden + 3 x kv + 4 x intermediate
  values), for `batch_tokens` tokens; with activation checkpointing only each layer's input is kept
  plus one layer's full set while it is recomputed. The vision tower likewise, for image patches
  (an upper bound: `image_fraction` of the tokens are patches; 1.0 = all).
- logits: chunked loss: one chunk's float32 logits, probabilities and gradient; unchunked: every
  scored token's (the compute-dtype logits, their float32 copy, log-softmax and two gradients).
- buffers: the step's input tensors, RoPE tables, and the runtime (interpreter, libraries, CUDA
  context): a fixed allowance.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch

from phi4rv.config import Phi4RVConfig
from phi4rv.model.quant import DEQUANT_BLOCK_ELEMENTS, QuantLinear
from phi4rv.train.config import StageConfig, TrainConfig

GiB = 2**30
RUNTIME_BYTES = {"cpu": int(0.35 * GiB), "cuda": int(1.0 * GiB)}  # interpreter, torch, tokenizer (+ CUDA context)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


@dataclass
class MemoryPlan:
    stage: str
    world: int
    device: str
    parts: dict[str, int]  # the line items, bytes per process
    activations_checkpointed: int
    activations_full: int
    checkpointing: bool
    trainable: int  # parameter counts (forward-used)
    total_params: int
    device_memory: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def format(self) -> str:
        lines = [f"stage {self.stage}: {self.world} process(es) on {self.device}, per process "
                 f"({self.trainable:,} of {self.total_params:,} parameters train)"]
        for k, v in self.parts.items():
            extra = ""
            if k == "activations":
                extra = (f"  (with checkpointing {gib(self.activations_checkpointed)}, without {gib(self.activations_full)}; "
                         f"{'on' if self.checkpointing else 'off'})")
            lines.append(f"  {k:<12} {gib(v):>14}{extra}")
        lines.append(f"  {'total':<12} {gib(self.total):>14}")
        if self.device_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} in {gib(self.device_memory)} ({100 * self.total / self.device_memory:.0f}%)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _meta_model(mc: Phi4RVConfig, cfg: TrainConfig, lora: bool):
    from phi4rv.lora import apply_lora
    from phi4rv.model.quant import quantize_modules
    from phi4rv.model.vlm import Phi4RV

    with torch.device("meta"):
        model = Phi4RV(mc)
        if cfg.model.quantize:
            quantize_modules(model, cfg.model.quantize, getattr(torch, cfg.model.dtype), lm_head=False)
        if lora:
            lc = cfg.lora
            apply_lora(model, lc.rank, lc.alpha, 0.0, lc.targets, lc.vision_targets if lc.vision else None)
    return model


def _unit(name: str) -> str:
    m = re.match(r"(decoder\.layers\.\d+|vision\.encoder\.layers\.\d+|decoder\.embed_tokens|decoder\.lm_head)\.", name)
    return m.group(1) if m else "root"


def plan_memory(
    cfg: TrainConfig,
    stage_name: str,
    mc: Phi4RVConfig,
    world: int = 1,
    device: str = "cuda",
    device_memory: int | None = None,
    image_fraction: float = 1.0,
    stage: StageConfig | None = None,
) -> MemoryPlan:
    """Bytes per process of one stage at `world` processes (see the module docstring)."""
    from phi4rv.train.stages import part_of, unused_prefixes

    stage = stage or cfg.stages[stage_name]
    lora = "lora" in stage.train
    model = _meta_model(mc, cfg, lora)
    unused = unused_prefixes(model)
    base_bytes = DTYPE_BYTES[cfg.model.dtype]
    bf16 = cfg.precision == "bfloat16"
    # activations: bf16 under autocast, else the dtype of the decoder's layer weights (float32 when
    # the decoder trains, the base dtype when it is frozen or carries adapters)
    act = 2 if bf16 else (4 if "decoder" in stage.train else base_bytes)
    gathered_bytes = 2 if bf16 else None  # FSDP2 MixedPrecisionPolicy(param_dtype=bf16)

    stored = grads = trainable = total = autocast_copies = 0
    unit_bytes: dict[str, int] = {}
    unit_grad: dict[str, int] = {}
    for name, p in model.named_parameters():
        used = not name.startswith(unused)
        trains = used and part_of(name) in stage.train
        nbytes = p.numel() * (4 if trains else base_bytes)
        stored += nbytes
        total += p.numel() if used else 0
        u = _unit(name)
        unit_bytes[u] = unit_bytes.get(u, 0) + p.numel() * (gathered_bytes or (4 if trains else base_bytes))
        if trains:
            trainable += p.numel()
            grads += p.numel() * 4
            unit_grad[u] = unit_grad.get(u, 0) + p.numel() * (gathered_bytes or 4)
        if bf16 and world == 1 and used and p.ndim == 2 and (4 if trains else base_bytes) == 4 and "embed" not in name:
            autocast_copies += p.numel() * 2  # the bf16 copy a matmul keeps for its backward
    quantized = sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                    if name.endswith(("qweight", "scales", "packed", "scales_and_zeros")))
    if quantized:
        total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    layer_units = [v for k, v in unit_bytes.items() if k != "root"]
    if world > 1:
        params = stored // world
        # the root, the running and the prefetched unit, and one all-gather buffer: FSDP2 gathers
        # a unit into one flat buffer, then copies it out into the unsharded parameters
        gathered = unit_bytes.get("root", 0) + sum(sorted(layer_units)[-2:]) + max(unit_bytes.values())
        grad_bytes = grads // world + unit_grad.get("root", 0) + max((v for k, v in unit_grad.items() if k != "root"), default=0)
    else:
        params, gathered, grad_bytes = stored, autocast_copies, grads
    params += quantized
    optimizer = 2 * 4 * trainable // world

    d, v = mc.decoder, mc.vision
    t = stage.data.batch_tokens
    kv = d.num_key_value_heads * (d.hidden_size // d.num_attention_heads)
    per_token_layer = (8 * d.hidden_size + 3 * kv + 4 * d.intermediate_size) * act
    patches = int(t * image_fraction)
    per_patch_layer = (8 * v.hidden_size + 4 * v.intermediate_size) * act
    used_vision_layers = v.num_hidden_layers - 1
    embeds = t * d.hidden_size * act * 2  # the spliced input embeddings and the final norm's output
    full = t * per_token_layer * d.num_hidden_layers + patches * per_patch_layer * used_vision_layers + embeds
    ckpt = (t * d.hidden_size * act * d.num_hidden_layers + t * per_token_layer
            + patches * v.hidden_size * act * used_vision_layers + patches * per_patch_layer + embeds)
    if not any(part_of(n) in stage.train for n, _ in model.named_parameters()):
        full = ckpt = 0
    activations = ckpt if cfg.activation_checkpointing else full

    vocab = d.vocab_size
    chunk = cfg.loss_chunk_tokens
    if chunk:
        logits = min(chunk, t) * vocab * (4 + 4 + act)
    else:
        logits = t * vocab * (act + 4 * 4)
    buffers = t * 8 * 4 + 2 * t * (d.hidden_size // d.num_attention_heads) * 4 + RUNTIME_BYTES.get(device, RUNTIME_BYTES["cuda"])
    if quantized:
        buffers += DEQUANT_BLOCK_ELEMENTS * 2 * DTYPE_BYTES[cfg.model.dtype]  # a dequantized block and its product in the backward

    parts = {"parameters": params, "gathered": gathered, "gradients": grad_bytes, "optimizer": optimizer,
             "activations": activations, "logits": logits, "buffers": buffers}
    notes = []
    if quantized:
        notes.append(f"decoder layers quantized to {cfg.model.quantize} (QLoRA): {gib(quantized)} on every process")
    if image_fraction >= 1.0 and v.num_hidden_layers > 1:
        notes.append("vision activations assume every token is an image patch (an upper bound)")
    return MemoryPlan(stage_name, world, device, parts, ckpt, full, cfg.activation_checkpointing,
                      trainable, total, device_memory, notes)


def options_that_fit(cfg: TrainConfig, stage_name: str, mc: Phi4RVConfig, world: int, device: str,
                     device_memory: int, image_fraction: float = 1.0) -> list[str]:
    """Changes that make the stage fit, each with its per-process total."""
    out = []
    stage = cfg.stages[stage_name]

    def total(c: TrainConfig, w: int = world, st: StageConfig | None = None) -> int:
        return plan_memory(c, stage_name, mc, w, device, device_memory, image_fraction, st).total

    if not cfg.activation_checkpointing:
        c = dataclasses.replace(cfg, activation_checkpointing=True)
        if (n := total(c)) <= device_memory:
            out.append(f"activation_checkpointing=true: {gib(n)}")
    if not cfg.loss_chunk_tokens:
        c = dataclasses.replace(cfg, loss_chunk_tokens=256)
        if (n := total(c)) <= device_memory:
            out.append(f"loss_chunk_tokens=256: {gib(n)}")
    bt = stage.data.batch_tokens
    while bt // 2 >= stage.data.max_len:
        bt //= 2
        st = dataclasses.replace(stage, data=dataclasses.replace(stage.data, batch_tokens=bt))
        if (n := total(cfg, st=st)) <= device_memory:
            out.append(f"stages.{stage_name}.data.batch_tokens={bt} (tokens_per_step unchanged, more accumulation): {gib(n)}")
            break
    w = world
    while w < 4096:
        w *= 2
        if (n := total(cfg, w)) <= device_memory:
            out.append(f"{w} processes (torchrun): {gib(n)} each")
            break
    if "lora" in stage.train and cfg.model.quantize != "int4":
        for mode in ("int8", "int4") if cfg.model.quantize is None else ("int4",):
            c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantize=mode))
            if (n := total(c)) <= device_memory:
                out.append(f"model.quantize={mode} (QLoRA: adapters on a frozen {mode} base): {gib(n)}")
                break
    if "lora" not in stage.train and "decoder" in stage.train:
        train = {k: v for k, v in stage.train.items() if k != "decoder"}
        train["lora"] = stage.train["decoder"] * 10
        st = dataclasses.replace(stage, train=train)
        c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="bfloat16"), activation_checkpointing=True)
        if (n := total(c, st=st)) <= device_memory:
            out.append(f"LoRA on a bf16 base with checkpointing (train.lora instead of train.decoder, model.dtype=bfloat16): {gib(n)}")
    return out
