"""Checkpoints in the release's format: sharded safetensors + index, transformers' key names.

Our module tree is `vision / projector / decoder`; the release nests the same weights under
`model.vision_tower.vision_tower.vision_model.`, `model.mm_projector.`, `model.` and `lm_head.`.
Loading builds the model on the meta device and fills it one tensor at a time from the files,
so peak memory stays near the size of the weights. Pickled formats are refused.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from phi4rv.config import Phi4RVConfig
from phi4rv.memory import available_memory
from phi4rv.model import Phi4RV
from phi4rv.model.decoder import RMSNorm
from phi4rv.model.quant import (
    QUANTIZE_MODES,
    QuantLinear,
    check_mode,
    load_stored,
    quantize_modules,
    quantized_name,
    stored_format,
    stored_layout,
    stored_tensors,
)

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
            raise CheckpointError(
                f"{path}: incomplete checkpoint, index lists missing weight files ({len(missing)} of {len(files)}): "
                f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    counts = {int(m.group(1)) for f in files if (m := re.fullmatch(r"model-\d+-of-(\d+)\.safetensors", f.name))}
    for n in counts:  # shards named model-0000i-of-0000n with no index: all n must be there
        names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        missing = [f for f in names if not (path / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{path}: incomplete checkpoint, missing weight files ({len(missing)} of {n}): "
                f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
            )
    if files:
        return files
    pickled = [p.name for p in path.iterdir() if p.suffix in _PICKLED]
    if pickled:
        raise CheckpointError(
            f"{path}: only pickled weights found ({', '.join(pickled)}); phi4rv never unpickles checkpoints, "
            "convert them to safetensors"
        )
    raise CheckpointError(f"{path}: no *.safetensors weights")


ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
# What loading may hold beyond the loaded weights and one tensor as stored: quantization reads and
# works on 1024 rows at a time (stored, fp32 and int32 temporaries: ~1024 * 17920 * 20 bytes = 367 MB
# at the 15B's widths, for down_proj), int4 holds a layer's nibbles before packing them (46 MB), and
# a w8a8 matrix on CPU is held twice while oneDNN packs it (the 15B's LM head: 2 x 514 MB).
LOAD_ALLOWANCE_BYTES = 520 * 2**20
QUANTIZATION_KEY = "quantization_config"  # config.json of a folder written by `save_quantized`


@dataclass
class StoredTensor:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(file: Path) -> dict[str, StoredTensor]:
    """The tensors a safetensors file holds, from its JSON header (8-byte length, then JSON)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(size - 8, 100 * 2**20):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        out = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            b, e = (8 + n + int(o) for o in info["data_offsets"])
            numel = 1
            for d in shape:
                numel *= d
            if e - b != numel * dtype.itemsize or e > size:
                raise ValueError(f"{key}: data runs past the end of the file or does not match its shape")
            out[key] = StoredTensor(file, dtype, shape, b, e)
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def read_tensor(st: StoredTensor, fd: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one stored tensor with positioned reads into `out` (or a new tensor): no mmap, no copy.

    A memory map of a 5 GB shard keeps every page it touched in this process's RSS until the
    whole file is unmapped; reading each tensor into its destination keeps the process at the
    weights it holds (the page cache does the caching).
    """
    if out is None:
        out = torch.empty(st.shape, dtype=st.dtype)
    buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    done, total = 0, st.end - st.start
    while done < total:
        n = os.preadv(fd, [buf[done:]], st.start + done)
        if n <= 0:
            raise CheckpointError(f"{st.file.name}: truncated while reading a tensor")
        done += n
    return out


class StoredRows:
    """A stored 2-D tensor read a block of rows at a time (`rows[a:b]`): quantization never holds
    the full-precision matrix, only the block it is working on."""

    def __init__(self, st: StoredTensor, fd: int):
        self.st, self.fd, self.shape = st, fd, torch.Size(st.shape)
        self.row_bytes = (st.end - st.start) // max(st.shape[0], 1)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        a, b, _ = rows.indices(self.shape[0])
        part = StoredTensor(self.st.file, self.st.dtype, (b - a, *self.shape[1:]),
                            self.st.start + a * self.row_bytes, self.st.start + b * self.row_bytes)
        return read_tensor(part, self.fd)


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters[leaf]
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)


def model_bytes(model: nn.Module, dtype: torch.dtype | None, stored: dict[str, torch.dtype]) -> int:
    """Bytes the (meta) model will take once loaded: its buffers and parameters in their final dtypes."""
    total = sum(b.numel() * b.element_size() for b in model.buffers())
    for name, p in model.named_parameters():
        dt = dtype if dtype is not None and p.is_floating_point() else stored.get(name, p.dtype)
        total += p.numel() * dt.itemsize
    return total


def estimate_load_bytes(cfg: Phi4RVConfig, dtype: torch.dtype, quantize: str | None, lm_head: bool = True) -> int:
    """What `load_model` will hold for this config in `dtype`, optionally quantized (meta device)."""
    with torch.device("meta"):
        model = Phi4RV(cfg)
    if quantize:
        quantize_modules(model, quantize, dtype, lm_head=lm_head)
    return model_bytes(model, dtype, {})


def _check_memory(cfg: Phi4RVConfig, dtype: torch.dtype, quantize: str | None, device: torch.device, need: int) -> None:
    free = available_memory(device)
    if free is None or need + LOAD_ALLOWANCE_BYTES <= free:
        return
    gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
    options = []
    for q in ("int8", "int4"):
        if q != quantize:
            fits = estimate_load_bytes(cfg, dtype, q) + LOAD_ALLOWANCE_BYTES
            if fits <= free:
                options.append(f"--quantize {q} (~{gb(fits)})")
    hint = "; " + " or ".join(options) + " would fit" if options else "; nothing fits: free memory or use a larger machine"
    what = f"{str(dtype).removeprefix('torch.')}{' + ' + quantize if quantize else ''}"
    raise CheckpointError(
        f"not enough memory on {device}: the model as {what} needs ~{gb(need + LOAD_ALLOWANCE_BYTES)}, "
        f"{gb(free)} available{hint}"
    )


def stored_parameters(path: Path, model: nn.Module) -> dict[str, StoredTensor]:
    """Where each of `model`'s parameters is stored in the checkpoint folder `path` (by parameter
    name), checked against the model's shapes: one-line errors for unexpected, missing or
    misshapen weights. The quantized layers of a model built for a pre-quantized folder expect
    the tensors of `stored_layout` instead of a weight."""
    stored: dict[str, StoredTensor] = {}
    for file in weight_files(path):
        stored.update(read_header(file))
    expected = {name: (tuple(p.shape), None) for name, p in model.named_parameters()}
    for module_name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            expected.update({f"{module_name}.{leaf}": want for leaf, want in stored_layout(m).items()})
    found, unexpected = {}, []
    for key, st in stored.items():
        name = from_release_name(key)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        want, dtype = expected[name]
        if st.shape != want:
            raise CheckpointError(f"{st.file.name}: {key} has shape {list(st.shape)}, config expects {list(want)}")
        if dtype is not None and st.dtype != dtype and not (dtype.is_floating_point and st.dtype.is_floating_point):
            raise CheckpointError(f"{st.file.name}: {key} is stored as {st.dtype}, expected {dtype}")
        found[name] = st
    if unexpected:
        raise CheckpointError(f"{path}: unexpected weights: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    missing = [to_release_name(n) for n in expected if n not in found]
    if missing:
        raise CheckpointError(f"{path}: missing weights: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return found


def load_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    config: Phi4RVConfig | None = None,
    quantize: str | None = None,
    quantize_vision: bool = False,
    check_memory: bool = True,
    quantize_lm_head: bool = True,
    before_read: Callable[[Phi4RVConfig, torch.dtype, int | None], None] | None = None,
) -> Phi4RV:
    """Load a checkpoint folder. `dtype=None` keeps each tensor's stored dtype.

    The model is built on the meta device and each tensor is read from its shard straight into
    its final dtype and device: a tensor stored in the target dtype on CPU is read into its
    parameter with no copy, others pass through one temporary of their stored size. With
    `quantize` ("int8" | "int4" | "w8a8", see `phi4rv.model.quant`) each linear weight is read and
    quantized 1024 rows at a time, so the full-precision model, or even one full-precision
    matrix, never exists. Peak memory: the loaded weights + LOAD_ALLOWANCE_BYTES, plus the largest
    stored tensor when a dtype conversion is asked for. The need is estimated before anything is read
    and refused with a one-line error when the device has less free memory.
    `before_read(cfg, compute dtype, bytes free once loaded or None)` runs then too, before anything
    is read, so that what the caller allocates next (the server's KV cache) can be refused at once.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model folder not found: {path}")
    quantize = check_mode(quantize)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    device = torch.device(device)
    cfg = config or Phi4RVConfig.load(path)
    with torch.device("meta"):
        model = Phi4RV(cfg)
    saved = cfg.raw.get(QUANTIZATION_KEY)
    if saved is not None:  # a folder written by `phi4rv quantize`: its layers are built quantized
        if quantize is not None and stored_format(quantize) != stored_format(saved["mode"]):
            raise CheckpointError(f"{path} is quantized to {saved['mode']}; it cannot be loaded with --quantize {quantize}")
        quantize, quantize_vision = quantize or saved["mode"], saved["vision"]
        dtype = dtype or DTYPES[saved["dtype"]]
        quantize_modules(model, quantize, dtype, vision=quantize_vision)
    stored = stored_parameters(path, model)
    if quantize and saved is None:
        compute = dtype or stored["decoder.embed_tokens.weight"].dtype
        if not compute.is_floating_point:
            raise CheckpointError(f"{path}: cannot quantize a model stored as {compute}")
        dtype = compute
        quantize_modules(model, quantize, compute, vision=quantize_vision, lm_head=quantize_lm_head)
    need = model_bytes(model, dtype, {n: st.dtype for n, st in stored.items()})
    compute = dtype or stored["decoder.embed_tokens.weight"].dtype
    if check_memory:
        _check_memory(cfg, compute, quantize, device, need)
    if before_read is not None:
        free = available_memory(device)
        before_read(cfg, compute, None if free is None else free - need)
    by_file: dict[Path, list[str]] = {}
    for name, st in stored.items():
        by_file.setdefault(st.file, []).append(name)
    pending: dict[nn.Module, dict[str, torch.Tensor]] = {}  # saved quantized tensors, until a layer has all
    for file, file_names in by_file.items():
        fd = os.open(file, os.O_RDONLY)
        try:
            for name in sorted(file_names, key=lambda n: stored[n].start):
                st = stored[name]
                target = dtype if dtype is not None and st.dtype.is_floating_point else st.dtype
                owner = quantized_name(model, name)
                layout = stored_layout(owner[0]) if owner is not None else {}
                if owner is not None and owner[1] in layout:
                    got = pending.setdefault(owner[0], {})
                    last = len(got) + 1 == len(layout)
                    # int4 nibbles read last are unpacked a block of rows at a time, never whole
                    got[owner[1]] = StoredRows(st, fd) if last and owner[1] == "nibbles" else read_tensor(st, fd)
                    if last:
                        load_stored(owner[0], pending.pop(owner[0]), device)
                elif owner is not None and owner[1] == "weight":
                    owner[0].set_weight(StoredRows(st, fd), device)
                elif owner is not None:  # a quantized layer's bias
                    owner[0].bias = nn.Parameter(read_tensor(st, fd).to(device=device, dtype=target), requires_grad=False)
                elif target == st.dtype and device.type == "cpu":
                    _set_param(model, name, read_tensor(st, fd))
                else:
                    _set_param(model, name, read_tensor(st, fd).to(device=device, dtype=target))
        finally:
            os.close(fd)
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
    image_cfg = ImageProcessorConfig.from_model(cfg)
    (path / "preprocessor_config.json").write_text(json.dumps(image_cfg.to_dict(), indent=2) + "\n")
    gen = generation_config or release_generation_config(cfg)
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(path)


def shard_plan(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, in order: a new shard when the next tensor would overflow this one (as `save_weights`)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def random_fill(module: nn.Module, leaf: str, t: torch.Tensor, std: float, gen: torch.Generator | None) -> torch.Tensor:
    """The values `Phi4RV.init_weights` gives this parameter, drawn into `t` in place."""
    if isinstance(module, (nn.Linear, nn.Embedding)) and leaf == "weight":
        return t.normal_(0.0, std, generator=gen)
    if isinstance(module, nn.Linear) and leaf == "bias" or isinstance(module, nn.LayerNorm) and leaf == "bias":
        return t.zero_()
    if isinstance(module, (nn.LayerNorm, RMSNorm)) and leaf == "weight":
        return t.fill_(1.0)
    raise TypeError(f"no random init rule for {type(module).__name__}.{leaf}")


def write_streamed_weights(path: str | Path | None, specs: list[tuple[str, torch.Size, torch.dtype]],
                           tensors: Iterator[torch.Tensor], max_shard_bytes: int = 5 * 2**30) -> None:
    """`save_weights`' files (same shards, names, index) from `tensors`, one per (release name,
    shape, dtype) of `specs` in order, each written and dropped before the next is drawn: peak
    memory is one tensor, never a shard. The files are safetensors written directly (8-byte header
    length, JSON header, raw little-endian data). With `path` None the tensors are only drawn (a
    process that takes part in collective gathers but does not write)."""
    sizes = {name: shape.numel() * dtype.itemsize for name, shape, dtype in specs}
    plan = shard_plan(list(sizes.items()), max_shard_bytes)
    weight_map, total, at = {}, 0, 0
    for i, names in enumerate(plan, 1):
        fname = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        shard = specs[at : at + len(names)]
        at += len(names)
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in shard:
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + sizes[name]]}
            offset += sizes[name]
            weight_map[name] = fname
        total += offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(8 + len(blob)) % 8)
        f = open(Path(path) / fname, "wb") if path is not None else None
        try:
            if f is not None:
                f.write(len(blob).to_bytes(8, "little") + blob)
            for _, _, dtype in shard:
                t = next(tensors)
                if f is not None and t.numel():
                    f.write(memoryview(t.to(dtype).contiguous().view(-1).view(torch.uint8).numpy()))
                del t
        finally:
            if f is not None:
                f.close()
    if path is not None:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (Path(path) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_random_weights(
    model: Phi4RV, path: str | Path, dtype: torch.dtype, seed: int = 0, std: float = 0.02, max_shard_bytes: int = 5 * 2**30
) -> None:
    """Random weights for a (meta-device) model, drawn tensor by tensor into `save_weights`' layout
    (`write_streamed_weights`: peak memory is the largest tensor, the 15B's embedding, never the model)."""
    gen = torch.Generator().manual_seed(seed)
    params = list(model.named_parameters())

    def drawn():
        for name, p in params:
            module_name, _, leaf = name.rpartition(".")
            yield random_fill(model.get_submodule(module_name), leaf, torch.empty(p.shape, dtype=dtype), std, gen)

    specs = [(to_release_name(name), p.shape, dtype) for name, p in params]
    write_streamed_weights(path, specs, drawn(), max_shard_bytes)


def init_checkpoint(
    cfg: Phi4RVConfig, out: str | Path, dtype: torch.dtype, seed: int = 0, tokenizer=None, max_shard_bytes: int = 5 * 2**30
) -> Path:
    """A random-weight checkpoint of any size in the release layout, in bounded memory."""
    with torch.device("meta"):
        model = Phi4RV(cfg)
    write = lambda tmp: write_random_weights(model, tmp, dtype, seed, max_shard_bytes=max_shard_bytes)  # noqa: E731
    return save_checkpoint(model, out, tokenizer=tokenizer, dtype=dtype, write_weights=write)


def save_quantized(source: str | Path, out: str | Path, mode: str, vision: bool = False,
                   dtype: torch.dtype | str | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """A pre-quantized folder from the checkpoint `source`, with the values `load_model(source,
    quantize=mode)` would compute: `source`'s files other than the weights, copied as they are,
    config.json with a `quantization_config` entry, and safetensors shards in the release's names
    where each quantized layer holds `stored_layout`'s tensors instead of its weight. Streamed: one
    layer in memory at a time, never the model."""
    source = Path(source)
    mode = check_mode(mode)
    if mode is None:
        raise ValueError(f"choose a quantization mode: {', '.join(QUANTIZE_MODES)}")
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    cfg = Phi4RVConfig.load(source)
    if cfg.raw.get(QUANTIZATION_KEY) is not None:
        raise CheckpointError(f"{source} is already quantized ({cfg.raw[QUANTIZATION_KEY]['mode']})")
    with torch.device("meta"):
        model = Phi4RV(cfg)
    stored = stored_parameters(source, model)
    dtype = dtype or stored["decoder.embed_tokens.weight"].dtype
    quantize_modules(model, mode, dtype, vision=vision)
    fds: dict[Path, int] = {}

    def layer_tensors(layer: nn.Module, st: StoredTensor):
        made: dict[str, torch.Tensor] = {}

        def get(leaf: str) -> torch.Tensor:  # the layer is quantized once, when its first tensor is written
            if not made:
                made.update(stored_tensors(layer, StoredRows(st, fds[st.file])))
            return made.pop(leaf)
        return get

    specs, getters = [], []
    for name, st in sorted(stored.items(), key=lambda kv: (str(kv[1].file), kv[1].start)):
        owner = quantized_name(model, name)
        if owner is not None and owner[1] == "weight":
            get = layer_tensors(owner[0], st)
            for leaf, (shape, dt) in stored_layout(owner[0]).items():
                specs.append((to_release_name(f"{name.rpartition('.')[0]}.{leaf}"), torch.Size(shape), dt))
                getters.append(functools.partial(get, leaf))
        else:
            target = dtype if st.dtype.is_floating_point else st.dtype
            specs.append((to_release_name(name), torch.Size(st.shape), target))
            getters.append(lambda st=st, target=target: read_tensor(st, fds[st.file]).to(target))

    def fill(tmp: Path) -> None:
        for f in source.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                shutil.copyfile(f, tmp / f.name)
        config = json.loads((source / "config.json").read_text())
        config[QUANTIZATION_KEY] = {"quant_method": "phi4rv", "mode": mode, "vision": vision,
                                    "dtype": str(dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_streamed_weights(tmp, specs, (get() for get in getters), max_shard_bytes)

    fds.update({file: os.open(file, os.O_RDONLY) for file in {st.file for st in stored.values()}})
    try:
        return _write_folder(out, fill)
    finally:
        for fd in fds.values():
            os.close(fd)


def _write_folder(out: str | Path, fill) -> Path:
    """`fill(tmp)` writes a folder beside `out` that then replaces it: a crash leaves any previous one intact."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the saved folder private
    try:
        fill(tmp)
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


def save_checkpoint(
    model: Phi4RV,
    out: str | Path,
    tokenizer=None,
    generation_config: dict | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    write_weights=None,
) -> Path:
    """Write a complete checkpoint folder atomically: a crash mid-save leaves any previous one intact.

    `write_weights(folder)`, if given, writes the weights instead of `save_weights` (used by
    `init_checkpoint` to stream random weights for a meta-device model).
    """
    def fill(tmp: Path) -> None:
        weights_dtype = dtype or next(t.dtype for t in model.state_dict().values() if t.is_floating_point())
        write_metadata(model.cfg, tmp, tokenizer, generation_config, weights_dtype)
        if write_weights is not None:
            write_weights(tmp)
        else:
            save_weights(model, tmp, max_shard_bytes, dtype)

    return _write_folder(out, fill)
