"""MathVista (testmini, 1,000 questions).

Layout: Parquet under `mathvista/` (AI4Math copy, `testmini-*.parquet`): `pid`, `question`,
`image` (path), `decoded_image`, `choices` (list or null), `unit`, `precision` (float in this
copy: cast to int), `answer` (the option *text* for multiple choice), `question_type`
(`multi_choice` | `free_form`), `answer_type` (`text` | `integer` | `float` | `list`), `query`
(the official prompt with its hint: sent as is).

Extraction is deterministic (both harnesses send anything that is not a bare answer to a GPT
extractor): multiple choice → `extract_choice` (letter or option text), else the option within
half its length in edit distance (the official rule takes the nearest option at any distance,
which is a guess); free form → `scoring.free_form_value` (a boxed value, "answer is …", else the
last number). Then MathVista's normalisation on both sides: integer → str(int(x)), float →
str(round(x, int(precision))) (lmms-eval passes the float precision and fails every float
question), list → the numbers in order (VLMEvalKit never scores lists right), text → case-
insensitive. An optional LLM judge (`judge`, off by default, recorded when used) extracts only
when the deterministic reading finds nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from phi4rv.eval.extract import extract_choice, final_span, letters_for
from phi4rv.eval.scoring import UNPARSED, Scored, free_form_value, nearest_option, norm_text, normalise_mathvista
from phi4rv.eval.tasks.base import EvalSample, Task, image_ref, parquet_rows, user, with_image

Judge = Callable[[str, str], "str | None"]  # (question, answer) -> extracted answer or None


class MathVista(Task):
    name = "mathvista"
    folders = ("mathvista", "MathVista")
    layout = "mathvista/**/testmini-*.parquet: pid, query, decoded_image, choices, precision, answer, question_type, answer_type"

    def __init__(self, judge: Judge | None = None, judge_name: str | None = None):
        self.judge = judge
        self.judge_name = judge_name

    def options(self) -> dict:
        return {"judge": self.judge_name} if self.judge else {}

    def load(self, path: Path) -> list[EvalSample]:
        samples = []
        for row in parquet_rows(path, "testmini"):
            image = row.get("decoded_image") or row.get("image")
            choices = [str(c) for c in row["choices"]] if row.get("choices") else None
            precision = row.get("precision")
            query = row.get("query") or row["question"]
            samples.append(
                EvalSample(
                    id=str(row["pid"]),
                    messages=user(with_image(query)),
                    images=[image_ref(image, row["_file"].parent)],
                    target=str(row["answer"]),
                    groups={"question_type": row["question_type"]},
                    info={
                        "question": row["question"],
                        "choices": choices,
                        "answer_type": row["answer_type"],
                        "precision": int(precision) if precision is not None else None,
                    },
                )
            )
        return samples

    def score(self, sample: EvalSample, answer: str) -> Scored:
        scored = self._read(sample, answer)
        if scored is None and self.judge is not None and answer.strip():
            extracted = self.judge(sample.info["question"], answer)
            if extracted:
                scored = self._read(sample, extracted)
                if scored is not None:
                    scored.judged = True
        return scored or UNPARSED

    def _read(self, sample: EvalSample, answer: str) -> Scored | None:
        info = sample.info
        choices = info["choices"]
        if choices:
            letter = extract_choice(answer, letters_for(len(choices)), choices)
            if letter is not None:
                pred = choices[ord(letter) - 65]
            else:
                span = final_span(answer)
                i = nearest_option(span, choices) if span else None
                if i is None:
                    return None
                pred = choices[i]
            return Scored(float(norm_text(pred) == norm_text(sample.target)), True, pred)
        kind, precision = info["answer_type"], info["precision"]
        value = (final_span(answer) or None) if kind == "list" else free_form_value(answer)
        if value is None:
            return None
        pred = normalise_mathvista(value, kind, precision)
        if pred is None:
            return None
        gold = normalise_mathvista(sample.target, kind, precision)
        if kind == "text":
            return Scored(float(norm_text(pred) == norm_text(gold or "")), True, pred)
        return Scored(float(pred == gold), True, pred)
