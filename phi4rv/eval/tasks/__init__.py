"""The task registry: name -> Task class (each with its version).

| task          | split    | data folder under --data-dir |
|---------------|----------|------------------------------|
| chartqa       | test     | chartqa/                     |
| mathvista     | testmini | mathvista/                   |
| mmmu          | validation | mmmu/                      |
| screenspot_v2 | desktop, mobile, web | screenspot_v2/   |
| ai2d          | test     | ai2d/                        |
| ocrbench      | test     | ocrbench/                    |
| synthetic     | held-out | synthetic/ (or generated)    |
"""

from __future__ import annotations

from typing import Any

from phi4rv.eval.tasks.ai2d import AI2D
from phi4rv.eval.tasks.base import EvalError, EvalSample, Task
from phi4rv.eval.tasks.chartqa import ChartQA
from phi4rv.eval.tasks.mathvista import MathVista
from phi4rv.eval.tasks.mmmu import MMMU
from phi4rv.eval.tasks.ocrbench import OCRBench
from phi4rv.eval.tasks.screenspot import ScreenSpotV2
from phi4rv.eval.tasks.synthetic import Synthetic

TASKS: dict[str, type[Task]] = {
    t.name: t for t in (ChartQA, MathVista, MMMU, ScreenSpotV2, AI2D, OCRBench, Synthetic)
}
PAPER_AVERAGE = ("chartqa", "mathvista", "mmmu", "screenspot_v2")  # the Pareto figure's four (DESIGN.md §5)


def get_task(name: str, **options: Any) -> Task:
    if name not in TASKS:
        raise EvalError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name](**options)


__all__ = ["TASKS", "PAPER_AVERAGE", "get_task", "Task", "EvalSample", "EvalError"]
