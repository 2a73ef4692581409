"""Synthetic held-out task: the data engine's samples, so tiny models have a benchmark that means
something.

Data: any dataset in phi4rv's formats (`formats.read_samples`: a folder of Parquet shards, or
.jsonl / .json files) under `synthetic/`, whose samples carry the generator meta: `task`, `kind`
("perception" | "reasoning"), `mode`, `answer` (ground truth), `answer_type` ("number" | "text" |
"choice" | "box" | "order"), optionally `choices` and `tolerance`. The prompt is the conversation
up to its last assistant turn (which is dropped).

Without such a folder, and when `phi4rv.data.synth.GENERATORS` exists, samples are generated on
the fly from held-out seeds (`HELD_OUT_SEED_BASE + i`, `per_generator` each, at `difficulty`).

Score: the data engine's own verifier (`phi4rv.data.verify`, shared with curation and teacher
synthesis, so a sample counts as right here exactly when it would there): numbers within the
sample's tolerance, normalised texts, choice letters or option texts, boxes with IoU >= 0.5,
orders item by item. An answer its type's parser can't read is unparsed. Reported overall, per
generator task and per kind.
"""

from __future__ import annotations

from pathlib import Path

from phi4rv.data.formats import Sample, read_samples
from phi4rv.eval.scoring import UNPARSED, Scored
from phi4rv.eval.tasks.base import EvalError, EvalSample, Task
from phi4rv.processing.answers import parse_number
from phi4rv.processing.chat import parse_box

HELD_OUT_SEED_BASE = 1_000_000_000  # training data is generated from seeds far below this


def from_sample(s: Sample) -> EvalSample:
    messages = list(s.messages)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    meta = s.meta
    for key in ("answer", "answer_type"):
        if key not in meta:
            raise EvalError(f"synthetic sample {s.id} lacks meta[{key!r}] (is this generator output?)")
    return EvalSample(
        id=s.id,
        messages=messages,
        images=list(s.images),
        target=str(meta["answer"]),
        groups={"task": str(meta.get("task", "")), "kind": str(meta.get("kind", ""))},
        info={k: meta[k] for k in ("answer_type", "choices", "tolerance", "mode") if k in meta},
    )


class Synthetic(Task):
    name = "synthetic"
    folders = ("synthetic",)
    max_new_tokens = 512
    layout = "synthetic/*.parquet or *.jsonl in phi4rv's formats, meta: task, kind, mode, answer, answer_type"

    has_rules = False  # the data engine's verifier is this task's one rule

    def __init__(self, per_generator: int = 20, difficulty: str = "tiny", rules: str = "official"):
        super().__init__(rules)
        self.per_generator = per_generator
        self.difficulty = difficulty

    def find_data(self, data_dir: Path | None) -> Path | None:
        try:
            return super().find_data(data_dir)
        except EvalError:
            return None  # no data folder: `load` generates held-out samples

    def options(self) -> dict:
        return {"per_generator": self.per_generator, "difficulty": self.difficulty}

    def load(self, path: Path | None) -> list[EvalSample]:
        if path is None:
            return [from_sample(s) for s in self.generate()]
        if path.is_dir() and not any(path.glob("*.parquet")):
            files = sorted([*path.glob("*.jsonl"), *path.glob("*.json")])
            if not files:
                raise EvalError(f"no .parquet, .jsonl or .json files in {path}")
            return [from_sample(s) for f in files for s in read_samples(f)]
        return [from_sample(s) for s in read_samples(path)]

    def generate(self) -> list[Sample]:
        try:
            from phi4rv.data.synth import GENERATORS
        except ImportError:
            raise EvalError("no synthetic/ data folder, and the generators (phi4rv.data.synth) are not available") from None
        return [
            gen.generate(HELD_OUT_SEED_BASE + i, self.difficulty)
            for _, gen in sorted(GENERATORS.items())
            for i in range(self.per_generator)
        ]

    def score(self, sample: EvalSample, answer: str) -> Scored:
        from phi4rv.data import verify

        info, gold = sample.info, sample.target
        kind, choices = info["answer_type"], info.get("choices")
        final = verify.final_answer(answer)
        read = {
            "number": lambda: parse_number(final),
            "choice": lambda: verify.parse_choice(final, choices),
            "box": lambda: parse_box(final),
            "order": lambda: verify.parse_order(final),
        }.get(kind, lambda: final or None)()
        if not final or read is None:
            return UNPARSED
        tol = verify.tolerance_for({"tolerance": info.get("tolerance")})
        ok = verify.verify(answer, gold, kind, tol, choices)
        return Scored(float(ok), True, list(read) if isinstance(read, tuple) else read)
