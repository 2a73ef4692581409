"""OCRBench (1,000 questions of 10 types).

Layout: Parquet under `ocrbench/` (echo840 copy): `dataset`, `question`, `question_type`,
`answer` (list of strings), `image`. The question is sent as is.

Score, `rules="official"` (default), OCRBench's own rule (`official.ocrbench_match`): correct if
some gold answer, lower-cased and stripped with newlines as spaces, is a substring of the answer
treated alike; for `HME100k` rows newlines and spaces are removed and case is kept.
`rules="lenient"` (`scoring.ocr_match`): the same, except that HME100k removes every kind of
whitespace. Only the answer part is scored (reasoning stripped), so long thinking can't win by
containing the string. Reported overall (the official total /10) and per question type.
"""

from __future__ import annotations

from pathlib import Path

from phi4rv.eval.official import ocrbench_match
from phi4rv.eval.scoring import UNPARSED, Scored, ocr_match, parse_listish
from phi4rv.eval.tasks.base import EvalSample, Task, image_ref, parquet_rows, user, with_image


class OCRBench(Task):
    name = "ocrbench"
    version = "2"
    folders = ("ocrbench", "OCRBench")
    layout = "ocrbench/**/test-*.parquet: dataset, question, question_type, answer (list), image"

    def load(self, path: Path) -> list[EvalSample]:
        samples = []
        for i, row in enumerate(parquet_rows(path, "test")):
            samples.append(
                EvalSample(
                    id=str(row.get("id", i)),
                    messages=user(with_image(row["question"])),
                    images=[image_ref(row["image"], row["_file"].parent)],
                    target=[str(a) for a in parse_listish(row["answer"])],
                    groups={"question_type": row["question_type"]},
                    info={"dataset": row.get("dataset")},
                )
            )
        return samples

    def score(self, sample: EvalSample, answer: str) -> Scored:
        if not answer.strip():
            return UNPARSED
        match = ocrbench_match if self.rules == "official" else ocr_match
        hit = match(answer, sample.target, hme=sample.info.get("dataset") == "HME100k")
        return Scored(float(hit), True, answer.strip())
