"""AI2D (test, 3,088 diagram questions with 4 options).

Layout: Parquet under `ai2d/` (lmms-lab copy): `question`, `options` (list), `answer` (the
0-based index as a string), `image`. Prompt as lmms-eval: question, "A. option" lines, then
"Answer with the option's letter from the given choices directly.".

Score: the chosen letter equals `chr(65 + int(answer))`. `rules="official"` (default), lmms-eval's
`ai2d.yaml`: the letter of a leading "X.", else the whole answer, compared ignoring case and
punctuation (`official.ai2d_letter`: "B", "(B)", "B. larva" count; "The answer is B" does not,
and is counted unparsed). `rules="lenient"`: the VLMEvalKit-style reading (`extract.extract_choice`:
an explicit "answer is X", a leading letter, the last "(X)" or lone letter, or a unique option
text). Nothing readable → unparsed and wrong (never a random letter).
"""

from __future__ import annotations

from pathlib import Path

from phi4rv.eval.extract import extract_choice, letters_for
from phi4rv.eval.official import ai2d_letter
from phi4rv.eval.scoring import UNPARSED, Scored
from phi4rv.eval.tasks.base import EvalSample, Task, image_ref, parquet_rows, user, with_image

MC_PROMPT = "Answer with the option's letter from the given choices directly."


def format_options(options: list[str]) -> str:
    return "\n".join(f"{letter}. {opt}" for letter, opt in zip(letters_for(len(options)), options))


class AI2D(Task):
    name = "ai2d"
    version = "2"
    folders = ("ai2d", "AI2D")
    layout = "ai2d/**/test-*.parquet: question, options (list), answer (0-based index string), image"

    def load(self, path: Path) -> list[EvalSample]:
        samples = []
        for i, row in enumerate(parquet_rows(path, "test")):
            options = [str(o) for o in row["options"]]
            text = f"{row['question']}\n{format_options(options)}\n{MC_PROMPT}"
            samples.append(
                EvalSample(
                    id=str(row.get("id", i)),
                    messages=user(with_image(text)),
                    images=[image_ref(row["image"], row["_file"].parent)],
                    target=chr(65 + int(row["answer"])),
                    info={"options": options},
                )
            )
        return samples

    def score(self, sample: EvalSample, answer: str) -> Scored:
        options = sample.info["options"]
        if self.rules == "official":
            letter = ai2d_letter(answer)
            letter = letter if letter in letters_for(len(options)) else None
        else:
            letter = extract_choice(answer, letters_for(len(options)), options)
        if letter is None:
            return UNPARSED
        return Scored(float(letter == sample.target), True, letter)
