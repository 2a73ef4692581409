"""Typed configs for the model, read from and written to the release's `config.json`.

The release's file is a Phi-3 LM config with `mm_*` fields and a nested `vision_config`.
We own the fields the forward pass needs; every other field is kept verbatim in `raw` so a
load/save round trip returns the same file.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


@dataclass
class VisionConfig:
    """SigLIP-2 NaFlex vision tower (so400m/16 shapes by default)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    patch_size: int = 16
    num_channels: int = 3
    num_patches: int = 256  # learned position grid, 16x16
    layer_norm_eps: float = 1e-6
    model_type: str = "siglip2_vision_model"

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size**2

    @property
    def position_grid(self) -> int:
        side = round(self.num_patches**0.5)
        if side * side != self.num_patches:
            raise ValueError(f"vision num_patches={self.num_patches} is not a square grid")
        return side


@dataclass
class DecoderConfig:
    """Phi-3 architecture decoder (Phi-4-reasoning shapes by default)."""

    vocab_size: int = 100352
    hidden_size: int = 5120
    intermediate_size: int = 17920
    num_hidden_layers: int = 40
    num_attention_heads: int = 40
    num_key_value_heads: int = 10
    rope_theta: float = 500000.0
    partial_rotary_factor: float = 1.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


# Keys the release's config.json holds that the forward pass does not read, with the release's
# values: written when a config lacks them, so every checkpoint phi4rv saves holds the release's
# keys (llama.cpp's converter, vLLM and the release's own code read some of them).
RELEASE_DEFAULTS: dict[str, Any] = {
    "auto_map": {
        "AutoConfig": "modeling_phi4_visionr.Phi4VisionR",
        "AutoModelForCausalLM": "modeling_phi4_visionr.Phi4ForCausalLMV",
        "AutoProcessor": "processing_phi4_visionr.Phi4VisionRProcessor",
    },
    "attention_dropout": 0.0,
    "dtype": "bfloat16",
    "embd_pdrop": 0.0,
    "freeze_mm_mlp_adapter": False,
    "image_aspect_ratio": "square",
    "initializer_range": 0.02,
    "mm_projector_lr": 2e-05,
    "resid_pdrop": 0.0,
    "rope_scaling": None,
    "sliding_window": None,
    "tokenizer_padding_side": "right",
    "transformers_version": "4.56.1",
    "tune_mm_mlp_adapter": False,
    "unfreeze_vision_tower": True,
    "use_cache": False,
    "use_mm_proj": True,
    "use_s2": False,
}

# Fields we own at the top level of config.json: python name -> json name.
_DECODER_KEYS = {f.name: f.name for f in fields(DecoderConfig)}
_VISION_KEYS = {f.name: f.name for f in fields(VisionConfig)}
_OPTIONAL_VISION_KEYS = {"patch_size", "num_channels", "num_patches", "layer_norm_eps"}


@dataclass
class Phi4RVConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vision_tower: str = "google/siglip2-so400m-patch16-naflex"
    min_num_patches: int = 256
    max_num_patches: int = 3600
    bos_token_id: int | None = 100257
    eos_token_id: int | list[int] | None = 100265
    pad_token_id: int | None = 100349
    max_length: int = 8192  # `tokenizer_model_max_length`: what the model was trained on
    image_bidirectional_attention: bool = False  # opt-in; the release's inference code is causal
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- config.json ----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Phi4RVConfig:
        if d.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise ValueError(f"unsupported mm_projector_type {d['mm_projector_type']!r} (only mlp2x_gelu)")
        rope = d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"unsupported rope_scaling {rope!r}")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "vocab_size", "vision_config") if k not in d]
        if missing:
            raise ValueError(f"config.json lacks required fields: {', '.join(missing)}")
        dec = {k: d[k] for k in _DECODER_KEYS if k in d}
        decoder = DecoderConfig(**dec)
        decoder.num_key_value_heads = d.get("num_key_value_heads") or decoder.num_attention_heads
        vd = d["vision_config"]
        vis = VisionConfig(**{k: vd[k] for k in _VISION_KEYS if k in vd})
        tower = d.get("mm_vision_tower", "")
        if "patch_size" not in vd:
            m = re.search(r"patch(\d+)", tower)
            if m:
                vis.patch_size = int(m.group(1))
        if d.get("mm_hidden_size", vis.hidden_size) != vis.hidden_size:
            raise ValueError(f"config.json: mm_hidden_size {d['mm_hidden_size']} differs from the vision tower's "
                             f"hidden_size {vis.hidden_size} (the projector reads the tower's output)")
        return cls(
            vision=vis,
            decoder=decoder,
            vision_tower=tower,
            min_num_patches=d.get("min_num_patches", 256),
            max_num_patches=d.get("max_num_patches", 3600),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            max_length=d.get("tokenizer_model_max_length", 8192),
            image_bidirectional_attention=d.get("image_bidirectional_attention", False),
            raw=dict(d),
        )

    def to_hf(self) -> dict[str, Any]:
        d = dict(self.raw)
        d.setdefault("architectures", ["Phi4ForCausalLMV"])
        d.setdefault("model_type", "phi4-siglip")
        for k, v in RELEASE_DEFAULTS.items():
            d.setdefault(k, v)
        d.update(asdict(self.decoder))
        if d.get("original_max_position_embeddings") is None:  # never null: llama.cpp's converter reads it
            d["original_max_position_embeddings"] = self.decoder.max_position_embeddings
        d["rope_theta"] = int(self.decoder.rope_theta) if float(self.decoder.rope_theta).is_integer() else self.decoder.rope_theta
        d.setdefault("tie_word_embeddings", False)
        d.setdefault("hidden_act", "silu")
        d.setdefault("attention_bias", False)
        d.update(
            mm_vision_tower=self.vision_tower,
            mm_projector_type="mlp2x_gelu",  # the only projector (vision width -> decoder width)
            mm_hidden_size=self.vision.hidden_size,
            min_num_patches=self.min_num_patches,
            max_num_patches=self.max_num_patches,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            tokenizer_model_max_length=self.max_length,
        )
        if self.image_bidirectional_attention or "image_bidirectional_attention" in d:
            d["image_bidirectional_attention"] = self.image_bidirectional_attention
        vd = dict(self.raw.get("vision_config", {}))
        default = VisionConfig()
        for k, v in asdict(self.vision).items():
            implied = k == "patch_size" and f"patch{v}" in self.vision_tower
            if k in _OPTIONAL_VISION_KEYS and k not in vd and (v == getattr(default, k) and (k != "patch_size" or implied)):
                continue
            vd[k] = v
        d["vision_config"] = vd
        # The release's order: keys sorted, the nested vision config last (as transformers writes them).
        return {k: d[k] for k in sorted(d) if k != "vision_config"} | {"vision_config": vd}

    @classmethod
    def load(cls, path: str | Path) -> Phi4RVConfig:
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from None
        return cls.from_hf(d)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.to_hf(), indent=2) + "\n")

    def replace(self, **kw: Any) -> Phi4RVConfig:
        return replace(self, **kw)


def _tiny() -> Phi4RVConfig:
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3)
    decoder = DecoderConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    return Phi4RVConfig(
        vision=vision,
        decoder=decoder,
        vision_tower="phi4rv/siglip2-tiny-patch16-naflex",
        min_num_patches=16,
        max_num_patches=256,
        max_length=4096,
    )


def _small() -> Phi4RVConfig:
    """~127M parameters (most in the 100352-token embeddings): a realistic size for serving benchmarks."""
    vision = VisionConfig(hidden_size=192, intermediate_size=768, num_attention_heads=3, num_hidden_layers=4)
    decoder = DecoderConfig(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    return Phi4RVConfig(
        vision=vision,
        decoder=decoder,
        vision_tower="phi4rv/siglip2-small-patch16-naflex",
        min_num_patches=16,
        max_num_patches=1024,
        max_length=4096,
    )


PRESETS = {
    "phi4rv-15b": Phi4RVConfig,  # the release's shapes (reference/config.json)
    "tiny": _tiny,
    "small": _small,
}


def preset(name: str) -> Phi4RVConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]()
