"""Training checkpoints: each process writes its own shards of the trained state, resumable at
any process count, plus (by default) a release-format copy of the weights for `phi4rv chat`.

    <stage dir>/step-00000120/        complete checkpoint (the name appears only once it is whole)
        config.json, model-*.safetensors, tokenizer ...   release format (`checkpoint.step_weights`,
                                      default on): `phi4rv chat` loads it
        trainer/state.json            step, data position, micro-batches per step, counters
        trainer/shards/shard-0000{r+1}-model-00001-of-00001.safetensors
                                      process r's shards of the trained parameters (every parameter
                                      that trains, LoRA adapters unmerged) and of their AdamW state,
                                      each tensor with its offset in the whole one
        trainer/optimizer.json        AdamW's parameter groups (learning rates, betas, ...)
        trainer/rng-rank{r}.json      every process's torch / python / numpy RNG state
        trainer/data_stream.json      a streamed stage's data position (`train.stream.DataStream.state`)
    <stage dir>/final/                release-format export at the end of the stage

The release-format weights are streamed: tensor by tensor, every process all-gathers one weight
(LoRA adapters merged into it), process 0 writes it into its place in the shard files and drops
it, so no process holds the whole model (peak: the largest tensor, not the model).

The shards are written and read with `torch.distributed.checkpoint` (DCP) through its
safetensors storage (`HuggingFaceStorageWriter(save_distributed=True)` / `HuggingFaceStorageReader`):
no process gathers the trainer state, and a resume at another process count reads, on each
process, the slices its own shards need from whichever files hold them. DCP's default file
storage would write its `.metadata` index with pickle (torch 2.13) and unpickle it on load; the
safetensors storage keeps the shard offsets as JSON in each file's header instead, so nothing here
is unpickled: tensors are safetensors, the rest JSON.

Frozen parameters are not in `trainer/`: a resume rebuilds them exactly as the stage started
(from the previous stage's result, `model.checkpoint`, or the seeded random init), then loads the
trained ones. Everything is written into `.step-N.partial/` and renamed by process 0 after all
processes are done, so a crash while saving leaves the previous checkpoint untouched; leftovers
are removed on the next save. Weights are saved in the training dtype, so reloading them is exact.
A LoRA stage's release weights are the merged ones (for chat).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from phi4rv.checkpoint import save_checkpoint, to_release_name, write_streamed_weights
from phi4rv.lora import dense_names, is_lora_param, lora_scales
from phi4rv.train.distributed import Dist

STEP_DIR = re.compile(r"^step-(\d{8})$")
SHARDS = "shards"
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


def _json_write(path: Path, obj, indent: int | None = 1) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
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


def trained_names(model: nn.Module) -> set[str]:
    """The parameters a checkpoint holds: those that train, and LoRA adapters (even frozen ones)."""
    return {n for n, p in model.named_parameters() if p.requires_grad or is_lora_param(n)}


def _first_failure(e) -> BaseException:
    return next(iter(e.failures.values()))[0]


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """This process's trainer state, without gathering: {flat name: tensor or DTensor shard}, and
    the non-tensor rest of the optimizer state (parameter groups, scalar slots)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    keep = trained_names(model)
    tensors = {f"model{_SEP}{k}": v for k, v in model_sd.items() if k in keep}
    rest: dict = {"param_groups": optim_sd["param_groups"], "scalars": {}}
    for name, slots in optim_sd["state"].items():
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim{_SEP}{name}{_SEP}{slot}"] = value
            else:
                rest["scalars"][f"{name}{_SEP}{slot}"] = value
    return tensors, rest


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
    step_weights: bool = True,
    data_state: dict | None = None,
) -> Path:
    """Collective: every process calls it and writes its own shards. Returns the checkpoint folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageWriter

    target = step_dir(stage_dir, step)
    partial = stage_dir / f".{target.name}.partial"
    if d.main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        for old in stage_dir.glob(".step-*.partial"):
            shutil.rmtree(old, ignore_errors=True)
    if step_weights:
        export_release(model, partial, tokenizer, d, lora)
    if d.main:
        (partial / "trainer" / SHARDS).mkdir(parents=True)
    d.barrier()
    tensors, rest = _sharded_state(model, optimizer)
    with warnings.catch_warnings():  # one process: DCP warns that it saves without a process group
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        try:
            dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(partial / "trainer" / SHARDS), save_distributed=True),
                     no_dist=not d.enabled)
        except CheckpointException as e:  # a BaseException holding every process's error: raise the first (disk full, ...)
            raise _first_failure(e) from None
    if d.main:
        _json_write(partial / "trainer" / "optimizer.json", rest)
        if data_state is not None:
            _json_write(partial / "trainer" / "data_stream.json", data_state, indent=None)
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


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer" / "state.json").read_text())


def read_data_state(ckpt: Path) -> dict | None:
    path = ckpt / "trainer" / "data_stream.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_training_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> dict:
    """Fill this process's shards of the trained parameters and their optimizer state from `ckpt`
    (saved at any process count) and restore this process's RNG when the process count is the
    same. Collective. Returns state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    trainer = ckpt / "trainer"
    state = read_state(ckpt)
    if not (trainer / SHARDS).is_dir():
        raise ValueError(f"{ckpt}: no sharded trainer state (trainer/{SHARDS}/): it was written by an older phi4rv and cannot be resumed")
    tensors, _ = _sharded_state(model, optimizer)  # the shapes and shards to fill, in place
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(trainer / SHARDS)), no_dist=not d.enabled)
    except CheckpointException as e:
        err = _first_failure(e)
        if isinstance(err, OSError):
            raise err from None
        # the planner's "Missing key in checkpoint state_dict: ...", a size mismatch, ...
        raise ValueError(f"{ckpt}: the saved trainer state does not match this stage's trained parameters "
                         f"({str(err).splitlines()[0][:300]})") from None
    rest = json.loads((trainer / "optimizer.json").read_text())
    model_sd, optim_state = {}, {}
    for flat, value in tensors.items():
        kind, _, name = flat.partition(_SEP)
        if kind == "model":
            model_sd[name] = value
        else:
            pname, _, slot = name.rpartition(_SEP)
            optim_state.setdefault(pname, {})[slot] = value
    for flat, value in rest["scalars"].items():
        pname, _, slot = flat.rpartition(_SEP)
        optim_state.setdefault(pname, {})[slot] = value
    set_state_dict(model, optimizer, model_state_dict=model_sd,
                   optim_state_dict={"state": optim_state, "param_groups": rest["param_groups"]},
                   options=StateDictOptions(strict=False))
    rng = trainer / f"rng-rank{d.rank}.json"
    if state.get("world_size", 1) == d.world and rng.is_file():
        set_rng_state(json.loads(rng.read_text()))
    return state


def gathered_weights(model: nn.Module, lora: bool):
    """(name, whole CPU tensor) for every weight in state-dict order, one tensor at a time, LoRA
    adapters merged as `lora.merge_state_dict` merges them, a quantized base (QLoRA) dequantized
    first. Collective under FSDP2: every process iterates to the end (each tensor is all-gathered
    on every process, then dropped)."""
    state, quantized = dense_names(model)  # under FSDP2: DTensors over this process's shards, nothing gathered
    scales = lora_scales(model) if lora else {}

    def whole(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()

    for name, t in state.items():
        if is_lora_param(name):
            continue
        w = quantized[name].dequantized() if name in quantized else whole(t)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in scales:
            delta = whole(state[f"{module}.lora_B"]).float() @ whole(state[f"{module}.lora_A"]).float() * scales[module]
            w = (w.float() + delta).to(w.dtype)
        yield name, w.cpu()


def write_gathered_weights(model: nn.Module, path: Path | None, lora: bool, dtype: torch.dtype | None = None,
                           max_shard_bytes: int = 5 * 2**30) -> None:
    """`checkpoint.save_weights`' files for a possibly sharded model, streamed: each tensor is
    gathered, written and freed before the next, so no process ever holds the whole model. The
    process that writes passes `path`; the others pass None and only take part in the gathers."""
    state, _ = dense_names(model)
    specs = [(to_release_name(k), t.shape, dtype or t.dtype) for k, t in state.items() if not is_lora_param(k)]
    write_streamed_weights(path, specs, (t for _, t in gathered_weights(model, lora)), max_shard_bytes)


def export_release(model: nn.Module, out: Path, tokenizer, d: Dist, lora: bool, dtype: torch.dtype | None = None) -> Path:
    """`model` as a release-format checkpoint (LoRA adapters merged), in `dtype` if given, written by
    process 0 one gathered tensor at a time. Collective."""
    if d.main:
        write = lambda tmp: write_gathered_weights(model, tmp, lora, dtype)  # noqa: E731
        save_checkpoint(model, out, tokenizer=tokenizer, dtype=dtype, write_weights=write)
    else:
        write_gathered_weights(model, None, lora, dtype)
    d.barrier()
    return out

