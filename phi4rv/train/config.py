"""Typed training configuration: dataclasses <-> YAML, with `dotted.key=value` command-line overrides.

A run is one YAML file: the starting model, then an ordered mapping of stages (DESIGN.md §4: e.g.
alignment -> instruction -> long), each saying which parts train at which learning rate, on which
data mixture, for how long. Stage k starts from stage k-1's final weights. Every check that can
fail does so in `load_config` / `validate`, before a model is built or a sample read, with a
one-line message naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PARTS = ("vision", "projector", "decoder", "lora")
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("float32", "bfloat16")  # float16 would need loss scaling
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    checkpoint: str | None = None  # a release-format folder to start from (weights + tokenizer)
    preset: str | None = None  # or build a fresh model from a preset ("tiny", "phi4rv-15b"), random init
    tokenizer: str | None = None  # tokenizer folder; default: the checkpoint's; "phi4" builds Phi-4's offline
    overrides: dict[str, Any] = field(default_factory=dict)  # model config fields, e.g. decoder.hidden_size: 32
    dtype: str = "float32"  # weights as loaded; trained parameters are always kept in float32
    chat_template: str | None = None  # a .jinja file replacing the tokenizer's template
    quantize: str | None = None  # QLoRA: "int8" | "int4" frozen base for the decoder's layers (LoRA stages only)


@dataclass
class DatasetConfig:
    path: str
    weight: float = 1.0  # times each usable sample appears per epoch (0.5 = a random half)
    image_root: str | None = None  # default: the dataset file's folder


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    think_ratio: float | None = None  # redraw each epoch so this fraction is <think> samples
    max_len: int = 2048  # longest sample in tokens (images expanded); longer ones are skipped
    batch_tokens: int = 8192  # tokens per micro-batch per process (rows of max_len when packing)
    tokens_per_step: int | None = None  # per optimizer step, all processes; default batch_tokens * world
    packing: bool = True
    shuffle: bool = True
    num_workers: int = 0  # background processes preparing micro-batches
    streaming: bool = False  # read .jsonl / Parquet as training goes (needs max_steps; see README)
    shuffle_buffer: int = 10000  # streaming: samples held for the seeded shuffle


@dataclass
class StageConfig:
    train: dict[str, float] = field(default_factory=dict)  # part -> learning rate; parts not listed are frozen
    data: DataConfig = field(default_factory=DataConfig)
    epochs: int = 1
    max_steps: int | None = None  # stop after this many steps (repeats epochs if needed)
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0  # final lr as a fraction of the peak
    weight_decay: float = 0.0  # on matrices only, never norms or biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0


@dataclass
class EvalConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)  # held-out data
    every: int = 0  # steps between evaluations; 0 = at the end of each stage only
    at_start: bool = False  # also evaluate before the first step (a baseline)
    max_samples: int | None = None
    generate: int = 0  # also greedy-decode the first N samples and score the final answers
    max_new_tokens: int = 64


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    vision: bool = False  # also adapt the vision encoder's linears
    vision_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = only at the end of each stage
    keep: int = 2  # step checkpoints kept per stage (the newest)
    export_dtype: str | None = None  # dtype of each stage's `final/` export; default: as trained
    step_weights: bool = True  # a release-format copy of the weights in each step-N/ (gathered on process 0)


@dataclass
class LogConfig:
    every: int = 1
    tensorboard: bool = True  # when tensorboard or tensorboardX is installed
    plot: bool = True
    progress: bool = True


@dataclass
class TrainConfig:
    run_dir: str
    model: ModelConfig
    stages: dict[str, StageConfig]
    seed: int = 0
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    precision: str = "float32"  # autocast dtype for the forward pass ("bfloat16" where supported)
    activation_checkpointing: bool = False
    loss_chunk_tokens: int = 256  # LM head + loss this many scored tokens at a time (0: all at once)
    device_memory: str | None = None  # per-process budget the memory plan must fit, e.g. "24GB"; default: the device's
    device: str = "auto"  # auto = cuda when available (one GPU per process under torchrun), else cpu

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- parsing -------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys, missing required keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
            raise ConfigError(f"unknown key '{path}'{hint}")
        kwargs[key] = _convert(value, hints[key], path)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing key '{where + '.' if where else ''}{f.name}'")
    return cls(**kwargs)


def apply_override(data: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` (list items by index: `datasets.0.path`) in a nested mapping, creating mappings."""
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {dotted}: no item {key} in {'.'.join(keys[:i])}")
            node = node[int(key)]
        else:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {dotted}: '{'.'.join(keys[: i + 1])}' is not a mapping")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {dotted}: no item {last}")
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """Read a YAML file (or start from `base`), apply `key=value` overrides, type-check, validate."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    else:
        data = dict(base or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for key, value in parse_overrides(list(overrides)):
        apply_override(data, key, value)
    cfg = from_dict(TrainConfig, data)
    validate(cfg)
    return cfg


# ---- validation ----------------------------------------------------------------------------


def _check_dataset(d: DatasetConfig, where: str) -> None:
    if not Path(d.path).exists():
        raise ConfigError(f"{where}.path: dataset not found: {d.path}")
    if d.weight < 0:
        raise ConfigError(f"{where}.weight must be >= 0, got {d.weight}")
    if d.image_root is not None and not Path(d.image_root).is_dir():
        raise ConfigError(f"{where}.image_root: folder not found: {d.image_root}")


def parse_size(text: str) -> int:
    """'24GB', '80GiB', '512MB', '1.5T' -> bytes (GB and GiB both mean 2**30: what GPUs advertise)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (e.g. 24GB, 80GiB, 512MB)")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def validate(cfg: TrainConfig) -> None:
    m = cfg.model
    if (m.checkpoint is None) == (m.preset is None):
        raise ConfigError("model: give exactly one of model.checkpoint or model.preset")
    if m.checkpoint is not None and not (Path(m.checkpoint) / "config.json").is_file():
        raise ConfigError(f"model.checkpoint: no checkpoint (config.json) in {m.checkpoint}")
    if m.preset is not None:
        from phi4rv.config import PRESETS

        if m.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {m.preset!r}; choose from {', '.join(PRESETS)}")
        if m.tokenizer is None:
            raise ConfigError("model.tokenizer: a model built from a preset needs a tokenizer folder (or 'phi4')")
    if m.tokenizer not in (None, "phi4") and not (Path(m.tokenizer) / "tokenizer.json").is_file():
        raise ConfigError(f"model.tokenizer: no tokenizer.json in {m.tokenizer}")
    if m.chat_template is not None and not Path(m.chat_template).is_file():
        raise ConfigError(f"model.chat_template: file not found: {m.chat_template}")
    if m.dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {', '.join(DTYPES)}, got {m.dtype!r}")
    if m.quantize not in (None, "int8", "int4"):
        raise ConfigError(f"model.quantize must be int8 or int4 (QLoRA), got {m.quantize!r}")
    if m.quantize is not None:
        for name, st in cfg.stages.items():
            if "lora" not in st.train or "decoder" in st.train:
                raise ConfigError(f"model.quantize: a quantized base only trains adapters, but stages.{name}.train has no 'lora' part")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.checkpoint.export_dtype not in (None, *DTYPES):
        raise ConfigError(f"checkpoint.export_dtype must be one of {', '.join(DTYPES)}, got {cfg.checkpoint.export_dtype!r}")
    for key in ("every", "keep"):
        if getattr(cfg.checkpoint, key) < 0:
            raise ConfigError(f"checkpoint.{key} must be >= 0")
    if cfg.lora.rank < 1:
        raise ConfigError(f"lora.rank must be >= 1, got {cfg.lora.rank}")
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    if not cfg.stages:
        raise ConfigError("stages: no stage to run")
    for name, st in cfg.stages.items():
        w = f"stages.{name}"
        if not st.train:
            raise ConfigError(f"{w}.train: the stage trains nothing (list parts with learning rates: {', '.join(PARTS)})")
        for part, lr in st.train.items():
            if part not in PARTS:
                raise ConfigError(f"{w}.train: unknown part {part!r}; parts are {', '.join(PARTS)}")
            if not lr > 0:
                raise ConfigError(f"{w}.train.{part}: learning rate must be > 0, got {lr}")
        if "lora" in st.train and "decoder" in st.train:
            raise ConfigError(f"{w}.train: 'decoder' (full) and 'lora' (adapters on the decoder) exclude each other")
        if "lora" in st.train and cfg.lora.vision and "vision" in st.train:
            raise ConfigError(f"{w}.train: 'vision' (full) and 'lora' with lora.vision exclude each other")
        if st.schedule not in SCHEDULES:
            raise ConfigError(f"{w}.schedule must be one of {', '.join(SCHEDULES)}, got {st.schedule!r}")
        if st.epochs < 1 and st.max_steps is None:
            raise ConfigError(f"{w}.epochs must be >= 1")
        if st.max_steps is not None and st.max_steps < 1:
            raise ConfigError(f"{w}.max_steps must be >= 1")
        if st.warmup_steps < 0 or not 0 <= st.min_lr_ratio <= 1 or st.weight_decay < 0:
            raise ConfigError(f"{w}: warmup_steps >= 0, 0 <= min_lr_ratio <= 1 and weight_decay >= 0 are required")
        if len(st.betas) != 2:
            raise ConfigError(f"{w}.betas: expected two values, got {st.betas}")
        d = st.data
        if not d.datasets:
            raise ConfigError(f"{w}.data.datasets: no dataset given")
        for i, ds in enumerate(d.datasets):
            _check_dataset(ds, f"{w}.data.datasets.{i}")
        if not any(ds.weight > 0 for ds in d.datasets):
            raise ConfigError(f"{w}.data.datasets: every weight is 0")
        if d.think_ratio is not None and not 0 <= d.think_ratio <= 1:
            raise ConfigError(f"{w}.data.think_ratio must be in [0, 1], got {d.think_ratio}")
        if d.max_len < 2 or d.batch_tokens < d.max_len:
            raise ConfigError(f"{w}.data: need 2 <= max_len <= batch_tokens, got {d.max_len} and {d.batch_tokens}")
        if d.tokens_per_step is not None and d.tokens_per_step % d.batch_tokens:
            raise ConfigError(f"{w}.data.tokens_per_step ({d.tokens_per_step}) must be a multiple of batch_tokens ({d.batch_tokens})")
        if d.num_workers < 0:
            raise ConfigError(f"{w}.data.num_workers must be >= 0")
        if d.streaming:
            if st.max_steps is None:
                raise ConfigError(f"{w}.max_steps: a streamed stage (data.streaming) needs max_steps, its data's size being unknown ahead")
            if d.think_ratio is not None:
                raise ConfigError(f"{w}.data.think_ratio is not supported with data.streaming (mix datasets by weight instead)")
            if d.shuffle_buffer < 1:
                raise ConfigError(f"{w}.data.shuffle_buffer must be >= 1")
            for i, ds in enumerate(d.datasets):
                if Path(ds.path).suffix == ".json":
                    raise ConfigError(f"{w}.data.datasets.{i}.path: a .json array cannot be streamed; "
                                      "write it as JSON lines (.jsonl) or set data.streaming: false")
    for i, ds in enumerate(cfg.eval.datasets):
        _check_dataset(ds, f"eval.datasets.{i}")
    if cfg.eval.every < 0 or cfg.eval.generate < 0 or cfg.eval.max_new_tokens < 1:
        raise ConfigError("eval: every >= 0, generate >= 0 and max_new_tokens >= 1 are required")
    if cfg.device_memory is not None:
        try:
            parse_size(cfg.device_memory)
        except ValueError as e:
            raise ConfigError(f"device_memory: {e}") from None
    if cfg.loss_chunk_tokens < 0:
        raise ConfigError(f"loss_chunk_tokens must be >= 0, got {cfg.loss_chunk_tokens}")
    if cfg.log.every < 1:
        raise ConfigError("log.every must be >= 1")
