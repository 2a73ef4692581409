"""MathVista (testmini, 1,000 questions).

Layout: Parquet under `mathvista/` (AI4Math copy, `testmini-*.parquet`): `pid`, `question`,
`image` (path), `decoded_image`, `choices` (list or null), `unit`, `precision` (float in this
copy: cast to int), `answer` (the option *text* for multiple choice), `question_type`
(`multi_choice` | `free_form`), `answer_type` (`text` | `integer` | `float` | `list`), `query`
(the official prompt with its hint: sent as is).

Extraction is deterministic (both harnesses send anything that is not a bare answer to a GPT
extractor; that step is replaced here): multiple choice → `extract_choice` (letter or option
text), else the answer's final span; free form → `scoring.free_form_value` (a boxed value,
"answer is …", else the last number, read as a plain number: `1,000` → 1000); list → the final
span. An optional LLM judge (`judge`, off by default, recorded when used) extracts only when the
deterministic reading finds nothing.

Score, `rules="official"` (default), MathVista's `calculate_score.py`: the extraction is
normalised (`official.mathvista_normalize`: a letter picks its option, else the nearest option by
edit distance at any distance; integer → str(int(float(x))); float → str(round(float(x),
int(precision))), the integer precision lmms-eval forgets; list → str(x)) and compared as a
string with the gold answer as the dataset gives it (not normalised).
`rules="lenient"`: an option only within half its length in edit distance (else unparsed), the
same normalisation applied to the gold answer too, lists compared as their numbers in order
(VLMEvalKit never scores lists right), text case-insensitive.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from phi4rv.eval.extract import extract_choice, final_span, letters_for
from phi4rv.eval.official import mathvista_normalize
from phi4rv.eval.scoring import UNPARSED, Scored, free_form_value, nearest_option, normalise_mathvista
from phi4rv.eval.tasks.base import EvalSample, Task, image_ref, parquet_rows, user, with_image
from phi4rv.processing.answers import norm_text, to_number

Judge = Callable[[str, str], "str | None"]  # (question, answer) -> extracted answer or None


class MathVista(Task):
    name = "mathvista"
    version = "2"
    folders = ("mathvista", "MathVista")
    layout = "mathvista/**/testmini-*.parquet: pid, query, decoded_image, choices, precision, answer, question_type, answer_type"

    def __init__(self, judge: Judge | None = None, judge_name: str | None = None, rules: str = "official"):
        super().__init__(rules)
        self.judge = judge
        self.judge_name = judge_name

    def options(self) -> dict:
        return {**super().options(), **({"judge": self.judge_name} if self.judge else {})}

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
        if self.rules == "official":
            return self._official(sample, answer)
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

    def _official(self, sample: EvalSample, answer: str) -> Scored | None:
        info = sample.info
        choices, kind = info["choices"], info["answer_type"]
        if choices:
            letter = extract_choice(answer, letters_for(len(choices)), choices)
            extraction = letter if letter is not None else final_span(answer)
        elif kind == "list":
            extraction = final_span(answer)
        else:
            value = free_form_value(answer)
            n = to_number(value) if value is not None else None
            extraction = repr(n) if n is not None else value
        if not extraction:
            return None
        pred = mathvista_normalize(extraction, choices, kind, info["precision"])
        if pred is None:
            return None
        return Scored(float(pred == sample.target), True, pred)
