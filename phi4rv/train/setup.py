"""What a stage starts from: the tokenizer, the model config (preset or checkpoint, with overrides),
the model itself (frozen parts, LoRA, FSDP2) and its optimizer, and the memory check before any
weight is read."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from phi4rv.checkpoint import (
    DTYPES,
    QUANTIZATION_KEY,
    CheckpointError,
    StoredRows,
    load_model,
    random_fill,
    stored_parameters,
)
from phi4rv.config import Phi4RVConfig, preset
from phi4rv.lora import apply_lora
from phi4rv.memory import available_memory
from phi4rv.model.quant import quantize_modules
from phi4rv.model.vlm import Phi4RV
from phi4rv.processing.chat import DEFAULT_CHAT_TEMPLATE
from phi4rv.processing.tokenizer import Tokenizer, build_phi4_tokenizer
from phi4rv.train.config import ConfigError, StageConfig, TrainConfig, parse_size
from phi4rv.train.distributed import Dist, local_rows, say, shard_model
from phi4rv.train.plan import gib, options_that_fit, plan_memory
from phi4rv.train.stages import build_optimizer, format_table, freeze_for_stage, parameter_table


def load_tokenizer(cfg: TrainConfig) -> Tokenizer:
    m = cfg.model
    if m.tokenizer == "phi4":
        with tempfile.TemporaryDirectory() as tmp:
            build_phi4_tokenizer(tmp)
            tok = Tokenizer.from_dir(tmp)
    else:
        tok = Tokenizer.from_dir(m.tokenizer or m.checkpoint)
    if m.chat_template:
        tok.chat_template = Path(m.chat_template).read_text()
    if tok.chat_template is None:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def apply_overrides(cfg: Phi4RVConfig, overrides: dict) -> Phi4RVConfig:
    """`model.overrides` ({"decoder.hidden_size": 32, ...}) set on `cfg`, each value in its field's type."""
    for dotted, value in overrides.items():
        *path, leaf = dotted.split(".")
        node = cfg
        for key in path:
            node = getattr(node, key, None)
        if node is None or not hasattr(node, leaf) or leaf == "raw":
            raise ConfigError(f"model.overrides: no model config field {dotted!r}")
        setattr(node, leaf, type(getattr(node, leaf))(value) if getattr(node, leaf) is not None else value)
    return cfg


def model_config(cfg: TrainConfig, source: Path | None, tokenizer: Tokenizer) -> Phi4RVConfig:
    """The starting model's config, without touching weights."""
    if source is not None:
        return Phi4RVConfig.load(source)
    if cfg.model.checkpoint:
        mc = Phi4RVConfig.load(cfg.model.checkpoint)
        if mc.raw.get(QUANTIZATION_KEY) is not None:
            raise CheckpointError(f"{cfg.model.checkpoint} was written by `phi4rv quantize`: train from the checkpoint "
                                  "it came from (model.quantize quantizes the frozen base for QLoRA)")
        return apply_overrides(mc, cfg.model.overrides)
    mc = preset(cfg.model.preset)
    mc.decoder.vocab_size = tokenizer.vocab_size
    mc.bos_token_id, mc.eos_token_id, mc.pad_token_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    return apply_overrides(mc, cfg.model.overrides)


def build_model(cfg: TrainConfig, stage: StageConfig, mc: Phi4RVConfig, source: Path | None,
                device: torch.device | str = "cpu") -> Phi4RV:
    """The stage's model as it starts, whole in one process (a resumed stage starts the same way,
    then loads its trained parameters from the checkpoint: train.checkpointing.load_training_checkpoint).
    A quantized base (QLoRA) is quantized on `device`: the int4 kernels' packed layouts differ
    between CPU and CUDA."""
    dtype = DTYPES[cfg.model.dtype]
    quantize = cfg.model.quantize  # QLoRA: the decoder's layers frozen in int8/int4, the LM head kept (chunked loss)
    if source is not None or cfg.model.checkpoint:
        model = load_model(source or cfg.model.checkpoint, dtype=dtype, config=mc, quantize=quantize,
                           quantize_lm_head=False, device=device if quantize else "cpu")
    else:
        torch.manual_seed(cfg.seed)
        model = Phi4RV(mc) if dtype == torch.float32 else init_in_dtype(mc, dtype)
        if dtype == torch.float32:
            model.init_weights()
        if quantize:
            quantize_modules(model.to(device), quantize, dtype, lm_head=False)
    prepare_for_stage(cfg, stage, model)
    return model.train()


def prepare_for_stage(cfg: TrainConfig, stage: StageConfig, model: Phi4RV) -> list[str]:
    """LoRA adapters (their A matrices drawn from `cfg.seed`), frozen parts, activation
    checkpointing; the adapted modules' names."""
    adapters = []
    if "lora" in stage.train:
        torch.manual_seed(cfg.seed)
        lc = cfg.lora
        adapters = apply_lora(model, lc.rank, lc.alpha, lc.dropout, lc.targets, lc.vision_targets if lc.vision else None)
    freeze_for_stage(model, stage)
    model.decoder.checkpointing = cfg.activation_checkpointing
    return adapters


def init_in_dtype(mc: Phi4RVConfig, dtype: torch.dtype) -> Phi4RV:
    """A randomly initialised model (Phi4RV.init_weights' rules, drawn in `dtype` from the global
    generator in the same order), built on the meta device and filled tensor by tensor, so that no
    float32 copy ever exists (at the 15B's widths the embeddings and LM head alone are 4 GB in
    float32)."""
    with torch.device("meta"):
        model = Phi4RV(mc)
    with torch.no_grad():
        for name, p in list(model.named_parameters()):
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            values = random_fill(module, leaf, torch.empty(p.shape, dtype=dtype), 0.02, None)
            module.register_parameter(leaf, torch.nn.Parameter(values, requires_grad=p.requires_grad))
    return model


def build_sharded_model(cfg: TrainConfig, stage: StageConfig, mc: Phi4RVConfig, path: Path, d: Dist) -> Phi4RV:
    """Under torchrun, from a checkpoint: the model built on the meta device, sharded with FSDP2,
    then each process fills only its own rows of each parameter from the checkpoint's shards
    (positioned reads of those rows, converted to the training dtype). No process ever holds the
    whole model; every world size starts from the same values as one process does (LoRA's A
    matrices included)."""
    dtype = DTYPES[cfg.model.dtype]
    with torch.device("meta"):
        model = Phi4RV(mc).to(dtype)
    stored = stored_parameters(path, model)
    names = [name for name, _ in model.named_parameters()]
    adapters = prepare_for_stage(cfg, stage, model)
    shard_model(model, d, torch.bfloat16 if cfg.precision == "bfloat16" else None)
    model.to_empty(device=d.device)
    params = dict(model.named_parameters())
    fds: dict[Path, int] = {}
    try:
        with torch.no_grad():
            for name in names:
                local, rows = local_rows(params[name], d)
                st = stored[name]
                fd = fds.setdefault(st.file, os.open(st.file, os.O_RDONLY))
                local.copy_(StoredRows(st, fd)[rows])
            if adapters:
                torch.manual_seed(cfg.seed)  # the adapters' draws, in apply_lora's order
            for name in adapters:
                adapter = model.get_submodule(name)
                a = torch.empty(adapter.lora_A.shape)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                local, rows = local_rows(adapter.lora_A, d)
                local.copy_(a[rows])
                local_rows(adapter.lora_B, d)[0].zero_()
    finally:
        for fd in fds.values():
            os.close(fd)
    return model.train()


def build_trainer(cfg: TrainConfig, stage: StageConfig, mc: Phi4RVConfig, source: Path | None,
                  d: Dist) -> tuple[Phi4RV, torch.optim.Optimizer]:
    """The stage's model on this process's device (sharded across processes) and its optimizer.
    From a preset (random weights) or with a quantized base (QLoRA: replicated, not sharded) every
    process builds the model whole first, as one process does."""
    path = source or cfg.model.checkpoint
    if d.enabled and path and not cfg.model.quantize:
        model = build_sharded_model(cfg, stage, mc, Path(path), d)
    else:
        model = build_model(cfg, stage, mc, source, d.device).to(d.device)
        if d.enabled:
            shard_model(model, d, torch.bfloat16 if cfg.precision == "bfloat16" else None)
    lora = "lora" in stage.train
    say(d, f"parts ({'LoRA r=' + str(cfg.lora.rank) + ', ' if lora else ''}{cfg.model.dtype}{' + ' + cfg.model.quantize + ' base' if cfg.model.quantize else ''} weights, {cfg.precision} compute):\n"
           + format_table(parameter_table(model, stage)))
    return model, build_optimizer(model, stage)


def device_memory(cfg: TrainConfig, d: Dist) -> int | None:
    """Memory one process may use: `device_memory` from the config, else the GPU's total, else
    the host's available memory shared by this node's processes."""
    if cfg.device_memory:
        return parse_size(cfg.device_memory)
    if d.device.type == "cuda":
        return torch.cuda.get_device_properties(d.device).total_memory
    free = available_memory(d.device)
    return None if free is None else free // max(int(os.environ.get("LOCAL_WORLD_SIZE", d.world)), 1)


def check_memory(cfg: TrainConfig, mc: Phi4RVConfig, d: Dist) -> None:
    """Refuse, before any weight is read, a stage that the memory plan says cannot fit."""
    budget = device_memory(cfg, d)
    if budget is None:
        return
    for name in cfg.stages:
        plan = plan_memory(cfg, name, mc, d.world, d.device.type, budget)
        if not plan.fits:
            options = options_that_fit(cfg, name, mc, d.world, d.device.type, budget)
            raise ConfigError(
                f"stages.{name} needs ~{gib(plan.total)} per process but {gib(budget)} is available "
                f"({', '.join(f'{k} {gib(v)}' for k, v in plan.parts.items())}); "
                + ("it would fit with: " + "; ".join(options) if options else "no usual change makes it fit")
                + " (`phi4rv train CONFIG --plan` for the whole plan)"
            )
