"""MMMU (validation, 900 questions in 30 subject configs).

Layout: Parquet under `mmmu/<Subject>/validation-*.parquet` (MMMU/MMMU copy): `id`, `question`
(with `<image k>` markers), `options` (a string holding a Python list), `answer`, `image_1` …
`image_7`, `question_type` (`multiple-choice` | `open`), `subfield`, ….

Prompt as lmms-eval (question, "A. option" lines, "Answer with the option's letter from the given
choices directly." / "Answer the question using a single word or phrase."), except where the
images go: each image referenced by a `<image k>` marker is placed before the text, in order of
first mention, and the markers stay in the text as names (lmms-eval swaps markers for image
slots in place, which breaks when an image is mentioned twice).

Score, `rules="official"` (default), the MMMU repository's `eval_utils.py`: multiple choice —
`official.mmmu_parse_choice` ("(X)", else " X ", else an option's text in answers over 5
words; the last of several); when nothing parses, the official random letter, drawn with a
seed per sample (`official.mmmu_random_choice`), scores as it falls and the record says
`unparsed`, so the report counts it. Open — `parse_open_response` / `eval_open` (key
sub-answers after "is", "therefore", "=", …, split on newlines only as the official regex does;
numbers rounded to 2 places, strings by containment). One decision beyond the official code: a
gold answer holding a Python list ("['24/7', '3.43']") is read as that list (the official code
compares the whole bracketed string and never scores those rows right).
`rules="lenient"`: multiple choice by `extract.extract_choice` (an explicit "answer is X" first,
then an answer-first letter, the last "(X)", the last lone letter, the option text), nothing
readable → unparsed and wrong; open by `scoring.mmmu_open_match` (also splits at ". " before a
word). Reported overall, per subject and per question type.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from phi4rv.eval.extract import extract_choice, letters_for
from phi4rv.eval.official import mmmu_eval_open, mmmu_parse_choice, mmmu_parse_open, mmmu_random_choice
from phi4rv.eval.scoring import UNPARSED, Scored, mmmu_open_match, parse_listish
from phi4rv.eval.tasks.ai2d import MC_PROMPT, format_options
from phi4rv.eval.tasks.base import EvalSample, Task, image_ref, parquet_rows, user, with_image

OPEN_PROMPT = "Answer the question using a single word or phrase."
_MARKER = re.compile(r"<image (\d+)>")


def subject_of(sample_id: str) -> str:
    m = re.fullmatch(r"(?:validation|test|dev)_(.+)_\d+", sample_id)
    return m.group(1) if m else ""


class MMMU(Task):
    name = "mmmu"
    version = "2"
    folders = ("mmmu", "MMMU")
    layout = "mmmu/<Subject>/validation-*.parquet: id, question, options (str list), answer, image_1..7, question_type"

    def load(self, path: Path) -> list[EvalSample]:
        samples = []
        for row in parquet_rows(path, "validation"):
            options = [str(o) for o in ast.literal_eval(row["options"])] if row.get("options") else []
            mc = row["question_type"] == "multiple-choice"
            text = f"{row['question']}\n{format_options(options)}\n\n{MC_PROMPT}" if mc else f"{row['question']}\n\n{OPEN_PROMPT}"
            order = list(dict.fromkeys(int(k) for k in _MARKER.findall(text)))
            if not order:
                order = [k for k in range(1, 8) if row.get(f"image_{k}") is not None]
            missing = [k for k in order if row.get(f"image_{k}") is None]
            if missing:
                raise ValueError(f"MMMU {row['id']}: the question mentions <image {missing[0]}> but image_{missing[0]} is empty")
            images = [image_ref(row[f"image_{k}"], row["_file"].parent) for k in order]
            samples.append(
                EvalSample(
                    id=row["id"],
                    messages=user(with_image(text, len(images))),
                    images=images,
                    target=row["answer"],
                    groups={"subject": subject_of(row["id"]), "question_type": row["question_type"]},
                    info={"options": options if mc else None},
                )
            )
        return samples

    def score(self, sample: EvalSample, answer: str) -> Scored:
        if self.rules == "official":
            return self._official(sample, answer)
        if not answer.strip():
            return UNPARSED
        options = sample.info.get("options")
        if options:
            letter = extract_choice(answer, letters_for(len(options)), options)
            if letter is None:
                return UNPARSED
            gold = [str(g).strip() for g in parse_listish(sample.target)]  # a few rows accept several letters
            return Scored(float(letter in gold), True, letter)
        hit, keys = mmmu_open_match(answer, sample.target)
        return Scored(float(hit), True, keys)

    def _official(self, sample: EvalSample, answer: str) -> Scored:
        golds = [str(g).strip() for g in parse_listish(sample.target)]
        options = sample.info.get("options")
        if options:
            letters = letters_for(len(options))
            letter = mmmu_parse_choice(answer, letters, options)
            if letter is None:
                guess = mmmu_random_choice(letters, sample.id)
                return Scored(float(guess in golds), False, guess)
            return Scored(float(letter in golds), True, letter)
        if not answer.strip():
            return UNPARSED
        preds = mmmu_parse_open(answer)
        return Scored(float(mmmu_eval_open(golds, preds)), True, preds)
