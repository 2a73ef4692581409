"""Checkpoints in the release's format: sharded safetensors + index, transformers' key names.

Our module tree is `vision / projector / decoder`; the release nests the same weights under
`model.vision_tower.vision_tower.vision_model.`, `model.mm_projector.`, `model.` and `lm_head.`.
Loading builds the model on the meta device and fills it one tensor at a time from the files,
so peak memory stays near the size of the weights. Pickled formats are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from phi4rv.config import Phi4RVConfig
from phi4rv.model import Phi4RV

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
# (ours, release) prefix pairs; the first match wins in either direction.
_PREFIXES = [
    ("vision.", VISION_PREFIX),
    ("projector.", "model.mm_projector."),
    ("decoder.lm_head.", "lm_head."),
    ("decoder.", "model."),
]
_UNUSED = (VISION_PREFIX + "head.",)  # SigLIP's attention-pool head: may be present, never used
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    pass


def to_release_name(name: str) -> str:
    for ours, theirs in _PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    raise KeyError(name)


def from_release_name(name: str) -> str | None:
    """Our parameter name for a release key; None for keys we deliberately ignore."""
    if name.startswith(_UNUSED):
        return None
    for ours, theirs in _PREFIXES:
        if name.startswith(theirs):
            return ours + name[len(theirs) :]
    return "?" + name  # unknown: reported as unexpected


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: index lists missing weight files: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickled = [p.name for p in path.iterdir() if p.suffix in _PICKLED]
    if pickled:
        raise CheckpointError(
            f"{path}: only pickled weights found ({', '.join(pickled)}); phi4rv never unpickles checkpoints, "
            "convert them to safetensors"
        )
    raise CheckpointError(f"{path}: no *.safetensors weights")


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)


def load_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    config: Phi4RVConfig | None = None,
) -> Phi4RV:
    """Load a checkpoint folder. `dtype=None` keeps each tensor's stored dtype."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model folder not found: {path}")
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    cfg = config or Phi4RVConfig.load(path)
    files = weight_files(path)
    with torch.device("meta"):
        model = Phi4RV(cfg)
    expected = dict(model.named_parameters())
    loaded, unexpected = set(), []
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device=str(device))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        with handle:
            for key in handle.keys():
                name = from_release_name(key)
                if name is None:
                    continue
                if name not in expected:
                    unexpected.append(key)
                    continue
                want = tuple(expected[name].shape)
                got = tuple(handle.get_slice(key).get_shape())
                if got != want:
                    raise CheckpointError(f"{file.name}: {key} has shape {list(got)}, config expects {list(want)}")
                try:
                    tensor = handle.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"{file.name}: cannot read {key} ({e})") from None
                _assign(model, name, tensor.to(dtype) if dtype is not None else tensor)
                loaded.add(name)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected weights: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    missing = [to_release_name(n) for n in expected if n not in loaded]
    if missing:
        raise CheckpointError(f"{path}: missing weights: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return model.eval()


def release_state_dict(model: Phi4RV) -> dict[str, torch.Tensor]:
    return {to_release_name(n): p.detach() for n, p in model.state_dict().items()}


def save_weights(model: Phi4RV, path: str | Path, max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None) -> None:
    """Write `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json`."""
    path = Path(path)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in release_state_dict(model).items():
        t = (t.to(dtype) if dtype is not None else t).contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def release_generation_config(cfg: Phi4RVConfig) -> dict:
    """generation_config.json with the release's keys and sampling defaults, ids from the config."""
    return {
        "_from_model_config": True,
        "bos_token_id": cfg.bos_token_id,
        "do_sample": True,
        "eos_token_id": [cfg.eos_token_id] if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "temperature": 0.8,
        "top_p": 0.95,
        "transformers_version": cfg.to_hf()["transformers_version"],
    }


def write_metadata(
    cfg: Phi4RVConfig, path: str | Path, tokenizer=None, generation_config: dict | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """The files around the weights: config.json (with `dtype` the weights' dtype),
    preprocessor_config.json, generation_config.json and, given a tokenizer, its files."""
    from phi4rv.processing.image import ImageProcessorConfig

    path = Path(path)
    if dtype is not None:
        cfg = cfg.replace(raw={**cfg.raw, "dtype": str(dtype).removeprefix("torch.")})
    cfg.save(path)
    image_cfg = ImageProcessorConfig(
        patch_size=cfg.vision.patch_size, min_num_patches=cfg.min_num_patches, max_num_patches=cfg.max_num_patches
    )
    (path / "preprocessor_config.json").write_text(json.dumps(image_cfg.to_dict(), indent=2) + "\n")
    gen = generation_config or release_generation_config(cfg)
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(path)


def save_checkpoint(
    model: Phi4RV,
    out: str | Path,
    tokenizer=None,
    generation_config: dict | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write a complete checkpoint folder atomically: a crash mid-save leaves any previous one intact."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the saved folder private
    try:
        weights_dtype = dtype or next(t.dtype for t in model.state_dict().values() if t.is_floating_point())
        write_metadata(model.cfg, tmp, tokenizer, generation_config, weights_dtype)
        save_weights(model, tmp, max_shard_bytes, dtype)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
