"""Training in declarative stages: `train("configs/tiny_recipe.yaml", ["seed=1"])` is `phi4rv train`.

config.py (typed YAML + overrides) -> loop.py (stages in order; one stage's steps), which uses
setup.py (tokenizer, model config, model + LoRA + optimizer), batches.py (data measured, planned,
loaded), loss.py, evaluation.py, stages.py (what trains), distributed.py (FSDP2 / torchrun),
checkpointing.py (exact resume, final export), metrics.py (JSONL, TensorBoard, plot) and plan.py
(memory plan); toy.py is a tiny dataset and config for tests and demos.
"""

from __future__ import annotations

from pathlib import Path

from phi4rv.train.config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config", "train"]


def train(config: str | Path | TrainConfig, overrides: list[str] = (), resume: bool = False) -> dict[str, Path]:
    """Run every stage; returns each stage's final (release-format) checkpoint folder."""
    from phi4rv.train.loop import run

    cfg = config if isinstance(config, TrainConfig) else load_config(config, list(overrides))
    return run(cfg, resume=resume)
