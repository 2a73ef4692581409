"""ChartQA (test: 1,250 human + 1,250 augmented questions).

Layout: Parquet under `chartqa/` — the lmms-lab copy (`type`, `question`, `answer`, `image`) or
the HuggingFaceM4 copy (`query`, `label` list, `human_or_machine`). Prompt as lmms-eval:
question + "Answer the question with a single word.".

Score, `rules="official"` (default): lmms-eval's relaxed accuracy (`official.chartqa_relaxed`)
on the raw answer (reasoning removed, nothing else): numbers as Python's `float` reads them
within 5% of a non-zero target, else a case-insensitive exact match; `1,000`, `$5`, `12.` with
words, a trailing period after a word or "The answer is X" are wrong, as they are there.
`rules="lenient"`: relaxed accuracy (`scoring.relaxed_match`) on the answer's final span
(`final_span`: a boxed value or what follows "answer is", else the whole answer), with thousands
separators, a trailing period, bold markers and a leading currency sign normalised away, and a
zero target compared numerically. Both: a trailing `%` divides by 100 (`45%` == 0.45 but != 45)
and years are numbers (2008 vs 2010 is within 5%, so correct). Reported overall and per type.
"""

from __future__ import annotations

from pathlib import Path

from phi4rv.eval.extract import final_span
from phi4rv.eval.official import chartqa_relaxed
from phi4rv.eval.scoring import UNPARSED, Scored, relaxed_match
from phi4rv.eval.tasks.base import EvalSample, Task, image_ref, parquet_rows, user, with_image

POST_PROMPT = "\nAnswer the question with a single word."


class ChartQA(Task):
    name = "chartqa"
    version = "2"
    folders = ("chartqa", "ChartQA")
    layout = "chartqa/**/test-*.parquet: type, question, answer, image (or query, label, human_or_machine)"

    def load(self, path: Path) -> list[EvalSample]:
        samples = []
        for i, row in enumerate(parquet_rows(path, "test")):
            question = row.get("question", row.get("query"))
            target = row["answer"] if "answer" in row else row["label"]
            kind = row.get("type")
            if kind is None and "human_or_machine" in row:
                kind = ("human_test", "augmented_test")[int(row["human_or_machine"])]
            samples.append(
                EvalSample(
                    id=str(i),
                    messages=user(with_image(question + POST_PROMPT)),
                    images=[image_ref(row["image"], row["_file"].parent)],
                    target=list(target) if isinstance(target, (list, tuple)) else target,
                    groups={"type": kind} if kind else {},
                )
            )
        return samples

    def score(self, sample: EvalSample, answer: str) -> Scored:
        targets = sample.target if isinstance(sample.target, list) else [sample.target]
        if self.rules == "official":
            pred = answer.strip()
            if not pred:
                return UNPARSED
            return Scored(float(any(chartqa_relaxed(pred, str(t)) for t in targets)), True, pred)
        pred = final_span(answer)
        if not pred:
            return UNPARSED
        return Scored(float(any(relaxed_match(pred, str(t)) for t in targets)), True, pred)
