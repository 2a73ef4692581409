"""Sizes of the recipe: how many samples, steps and parameters each step gets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from phi4rv.data.synth import Difficulty, with_knobs


@dataclass(frozen=True)
class RecipePreset:
    name: str
    # the world: one 16 px card per patch, 2-3 cards, digits drawn at 11-12 px
    width: tuple[int, int] = (96, 128)
    height: tuple[int, int] = (32, 48)
    font_size: tuple[int, int] = (11, 12)
    cards: tuple[int, int] = (2, 3)
    grid: int = 16
    # data
    per_perception_task: int = 2000  # synth samples per perception task (3 tasks)
    per_reasoning_task: int = 1000  # per reasoning task (2 tasks)
    think_ratio: float = 0.2
    heldout: float = 0.05  # the reported split
    validation: float = 0.05  # what settings are tuned on; no image in two splits
    eval_limit: int | None = 300  # held-out samples evaluated per mode
    text_samples: int = 8000  # stage 0 decoder corpus
    text_heldout: int = 200  # its held-out prompts (none in the corpus)
    caption_pairs: int = 8000  # stage 0 vision pairs
    caption_heldout: int = 256  # held-out pairs for image->caption retrieval
    align_samples: int = 3000  # stage 1
    stage3_samples: int = 1000
    vocab_size: int = 512
    system_prompt: str = "Be brief."
    # model: the tiny preset, a little wider and deeper
    model: dict[str, Any] = field(default_factory=lambda: {
        "decoder.hidden_size": 128, "decoder.intermediate_size": 384, "decoder.num_hidden_layers": 4,
        "min_num_patches": 4, "max_num_patches": 64,
    })
    # training
    batch_tokens: int = 1024
    text_epochs: int = 1
    text_lr: float = 5e-3
    contrastive_steps: int = 300
    contrastive_batch: int = 128
    align_epochs: int = 2
    instruction_epochs: int = 12  # at 6 the loss was still falling: perception 77% (91% at 12)
    stage3_epochs: int = 1
    # ablations
    ablate_low_patches: int = 6  # the low-resolution arm's patch budget (native: up to 24 per image)
    ablate_defects: float = 0.3  # share of training answers made wrong in the curation arms
    threads: int = 1  # torch threads, the same on every machine (one: no sum split by a machine's cores)
    max_new_tokens: int = 48
    eval_batch: int = 16

    def difficulty(self) -> Difficulty:
        return with_knobs("tiny", width=self.width, height=self.height, font_size=self.font_size,
                          elements=self.cards, grid=self.grid)


PRESETS = {
    "tiny": RecipePreset("tiny"),
    # the smallest run that goes through every step: for tests, seconds not minutes
    "test": RecipePreset(
        "test", per_perception_task=24, per_reasoning_task=12, heldout=0.2, validation=0.15, eval_limit=8, text_samples=64,
        text_heldout=16, caption_pairs=64, caption_heldout=32, align_samples=32, stage3_samples=16, vocab_size=320,
        model={"decoder.hidden_size": 32, "decoder.intermediate_size": 64, "decoder.num_hidden_layers": 1,
               "vision.hidden_size": 32, "vision.intermediate_size": 64, "vision.num_hidden_layers": 2,
               "min_num_patches": 4, "max_num_patches": 64},
        contrastive_steps=3, contrastive_batch=16, instruction_epochs=6, max_new_tokens=12, eval_batch=8, batch_tokens=512,
    ),
}


def get_preset(name: str, **changes: Any) -> RecipePreset:
    if name not in PRESETS:
        raise ValueError(f"unknown recipe preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name], **changes)
