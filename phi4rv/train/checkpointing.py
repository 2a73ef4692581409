"""Training checkpoints: a release-format model folder plus everything needed to resume exactly.

    <stage dir>/step-00000120/        complete checkpoint (the name appears only once it is whole)
        config.json, model-*.safetensors, tokenizer ...   release format: `phi4rv chat` loads it
        trainer/state.json            step, data position, counters, lr schedule position
        trainer/optimizer.safetensors + optimizer.json    AdamW state by parameter name
        trainer/rng-rank{r}.json      every process's torch / python / numpy RNG state
        trainer/trainable.safetensors (LoRA stages) adapters and other trained parameters, unmerged
    <stage dir>/final/                release-format export at the end of the stage

Everything is written into `.step-N.partial/` and renamed at the end, so a crash while saving
leaves the previous checkpoint untouched; leftovers are removed on the next save. Weights are
saved in the training dtype, so reloading them is exact. A LoRA stage's release weights are the
merged ones (for chat); resuming it rebuilds the stage's base model and loads the unmerged adapters.
Nothing here is unpickled: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from phi4rv.checkpoint import save_checkpoint
from phi4rv.lora import StateView, is_lora_param, lora_scales, merge_state_dict
from phi4rv.train.distributed import Dist, full_model_state, full_optimizer_state

STEP_DIR = re.compile(r"^step-(\d{8})$")
_SEP = "::"


def step_dir(stage_dir: Path, step: int) -> Path:
    return stage_dir / f"step-{step:08d}"


def latest_checkpoint(stage_dir: Path) -> Path | None:
    if not stage_dir.is_dir():
        return None
    steps = [
        (int(m.group(1)), p)
        for p in stage_dir.iterdir()
        if (m := STEP_DIR.match(p.name)) and (p / "trainer" / "state.json").is_file()
    ]
    return max(steps)[1] if steps else None


def _json_write(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for name, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}{_SEP}{key}"] = value.detach().cpu().contiguous()
            else:
                meta["scalars"][f"{name}{_SEP}{key}"] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        name, _, key = flat.rpartition(_SEP)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_checkpoint(
    stage_dir: Path,
    step: int,
    model,
    optimizer: torch.optim.Optimizer,
    state: dict,
    tokenizer,
    d: Dist,
    keep: int,
    lora: bool,
) -> Path:
    """Collective: every process calls it. Returns the checkpoint folder."""
    target = step_dir(stage_dir, step)
    partial = stage_dir / f".{target.name}.partial"
    weights = full_model_state(model, d)
    optim = full_optimizer_state(model, optimizer, d)
    if d.main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        for old in stage_dir.glob(".step-*.partial"):
            shutil.rmtree(old, ignore_errors=True)
        export = merge_state_dict(weights, lora_scales(model)) if lora else weights
        save_checkpoint(StateView(model.cfg, export), partial, tokenizer=tokenizer)
        trainer = partial / "trainer"
        trainer.mkdir()
        tensors, meta = _flatten_optimizer(optim)
        save_file(tensors, str(trainer / "optimizer.safetensors"))
        _json_write(trainer / "optimizer.json", meta)
        if lora:
            trainable = {n for n, p in model.named_parameters() if p.requires_grad or is_lora_param(n)}
            save_file({k: v.contiguous() for k, v in weights.items() if k in trainable}, str(trainer / "trainable.safetensors"))
    d.barrier()
    _json_write(partial / "trainer" / f"rng-rank{d.rank}.json", rng_state())
    d.barrier()
    if d.main:
        _json_write(partial / "trainer" / "state.json", {**state, "step": step, "world_size": d.world})
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)
        steps = sorted(p for p in stage_dir.iterdir() if STEP_DIR.match(p.name))
        for old in steps[: max(len(steps) - max(keep, 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return target


def load_trainer_state(ckpt: Path, d: Dist) -> tuple[dict, dict]:
    """(state.json, name-keyed optimizer state) of a checkpoint; restores this process's RNG."""
    trainer = ckpt / "trainer"
    state = json.loads((trainer / "state.json").read_text())
    tensors = load_file(str(trainer / "optimizer.safetensors"))
    optim = _unflatten_optimizer(tensors, json.loads((trainer / "optimizer.json").read_text()))
    rng = trainer / f"rng-rank{d.rank}.json"
    if state.get("world_size", 1) == d.world and rng.is_file():
        set_rng_state(json.loads(rng.read_text()))
    return state, optim


def load_trainable(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "trainer" / "trainable.safetensors"))


def export_final(model: nn.Module, out: Path, tokenizer, d: Dist, lora: bool, dtype: torch.dtype | None = None) -> Path:
    """The stage's result as a release-format checkpoint (LoRA adapters merged), in `dtype` if given."""
    weights = full_model_state(model, d)
    if d.main:
        if lora:
            weights = merge_state_dict(weights, lora_scales(model))
        save_checkpoint(StateView(model.cfg, weights), out, tokenizer=tokenizer, dtype=dtype)
    d.barrier()
    return out
