"""What every recipe step shares: the run folder (`Runner`: settings, finished steps, paths),
each step's one-line summary, and the training config the steps build."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from phi4rv.processing.reasoning import MODES
from phi4rv.recipe.presets import RecipePreset

STEPS = ("tokenizer", "data", "stage0_decoder", "stage0_vision", "stages", "eval", "report")


def say(msg: str) -> None:
    print(msg, flush=True)


class Runner:
    def __init__(self, out: Path, preset: RecipePreset, seed: int):
        self.out, self.p, self.seed = Path(out), preset, seed
        self.steps_dir = self.out / "steps"
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        settings = {"preset": asdict(preset), "seed": seed}
        saved = self.out / "recipe.json"
        if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(settings)):
            raise ValueError(f"{self.out} holds a run with other settings; choose another --out or delete it")
        saved.write_text(json.dumps(settings, indent=2) + "\n")

    def step(self, name: str, fn: Callable[[], dict[str, Any]], line: Callable[[dict], str]) -> dict[str, Any]:
        done = self.steps_dir / f"{name}.json"
        if done.is_file():
            result = json.loads(done.read_text())
            say(f"[{name}] done before ({result['seconds']:.0f} s): {line(result)}")
            return result
        say(f"== {name}")
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        result["seconds"] = round(time.perf_counter() - start, 1)
        # with one torch thread, about what the step takes on an idle core (wall time counts the wait on a busy machine)
        result["cpu_seconds"] = round(time.process_time() - cpu, 1)
        done.write_text(json.dumps(result, indent=2) + "\n")
        say(f"[{name}] {result['seconds']:.0f} s: {line(result)}")
        return result

    # ---- paths ----------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Path:
        return self.out / "tokenizer"

    def data(self, name: str) -> Path:
        return self.out / "data" / name

    @property
    def model(self) -> Path:
        return self.out / "model"


def train_config(run_dir: Path, model: dict, stages: dict, seed: int, eval_path: Path | None = None) -> Any:
    from phi4rv.train import load_config

    cfg = {
        "run_dir": str(run_dir), "seed": seed, "model": model, "stages": stages,
        "checkpoint": {"every": 0, "keep": 1},
        "log": {"every": 10, "progress": True, "plot": True, "tensorboard": False},
    }
    if eval_path is not None:
        cfg["eval"] = {"datasets": [{"path": str(eval_path)}], "max_samples": 200}
    return load_config(None, base=cfg)


def stage(parts: dict[str, float], datasets: list[tuple[Path, float]], p: RecipePreset, epochs: int,
          **extra: Any) -> dict:
    return {
        "train": parts,
        "data": {"datasets": [{"path": str(path), "weight": w} for path, w in datasets], "max_len": 256,
                 "batch_tokens": p.batch_tokens},
        "epochs": epochs, "warmup_steps": 20, "min_lr_ratio": 0.1, **extra,
    }


def eval_line(x: dict) -> str:
    parts = []
    for mode in MODES:
        if mode in x:
            row = x[mode]
            parts.append(f"{mode}: perception {row.get('perception', {}).get('accuracy', 0):.0f}%, "
                         f"reasoning {row.get('reasoning', {}).get('accuracy', 0):.0f}%")
    if "auto_choice" in x:
        parts.append(f"auto picks the right mode {x['auto_choice']:.0f}%")
    return "; ".join(parts)


LINES: dict[str, Callable[[dict], str]] = {
    "tokenizer": lambda x: f"{x['vocab_size']} tokens",
    "data": lambda x: (f"{x['synth']} synthesized, {x['kept']} kept by curation, {x['train']} train / "
                       f"{x['val']} validation / {x['heldout']} held out, think ratio {x['think_ratio']:.2f}; "
                       f"no stage trains on the {x['registry']['images']} held-out images or "
                       f"{x['registry']['prompts']} held-out prompts"),
    "stage0_decoder": lambda x: f"reasoning-text answer accuracy {x['answer_acc']:.2f} ({x['steps']} steps)",
    "stage0_vision": lambda x: (f"held-out image->caption retrieval {x['retrieval_before']:.2f} -> "
                                f"{x['retrieval_after']:.2f} among {x['heldout']} ({x['steps']} steps)"),
    "stages": lambda x: ", ".join(f"{k} {v['steps']} steps" for k, v in x["stages"].items()),
    "eval": eval_line,
    "report": lambda x: x["path"],
}
