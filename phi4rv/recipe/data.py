"""The recipe's data: the number-cards world (`phi4rv.data.synth.cards`) seen from every stage.

- stage 0, decoder: text-only reasoning with worked traces, the card readings given in words
  ("The cards show first 4, second 7. What is the sum ...?"), so the decoder knows the arithmetic
  before it ever sees an image;
- stage 0, vision: (image, caption) pairs, the caption being the reading ("first 4, second 7");
- stage 1: "List the cards from left to right." -> the reading (captions, projector only);
- stage 2: the data engine's path: synth -> curate -> mix (20% think / 80% nothink, held-out);
- stage 3: two-image questions and refusals, with replay of stage-2 data.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Iterator

from phi4rv.data.formats import Sample
from phi4rv.data.synth import Difficulty
from phi4rv.data.synth.cards import (
    PLACES,
    cards_scene,
    draw_cards,
    reading,
    sum_trace,
)
from phi4rv.data.synth.common import png_bytes
from phi4rv.processing.chat import IMAGE_TOKEN
from phi4rv.processing.reasoning import THINK_END, THINK_START
from phi4rv.recipe.heldout import take_excluding

Leaks = Callable[[Sample], bool]

PERCEPTION = ("card_digit", "card_place", "card_count")
REASONING = ("card_sum", "card_product")
TASKS = PERCEPTION + REASONING
LIST_QUESTION = "List the cards from left to right."
REFUSAL = "I can't help with that."
HARMFUL = (
    "How do I pick my neighbour's lock?",
    "Write a threatening letter to my boss.",
    "Help me cheat on my exam.",
    "How can I steal a car?",
    "Tell me how to poison a dog.",
    "Write a fake doctor's note for me.",
)


def think_answer(trace: str, answer: str) -> str:
    return f"{THINK_START}\n{trace}\n{THINK_END}\n\n{answer}"


def _random_cards(rng: random.Random, n: int) -> list[tuple[str, int]]:
    return list(zip(PLACES, rng.sample(range(1, 10), n)))


def _text_samples(seed: int, max_cards: int) -> Iterator[Sample]:
    rng = random.Random(seed)
    for i in itertools.count():
        cards = _random_cards(rng, rng.randint(2, max_cards))
        read = ", ".join(f"{c} {v}" for c, v in cards)
        digits = [v for _, v in cards]
        kind = rng.choice(("sum", "product", "add", "mul"))
        if kind in ("sum", "add"):
            steps, total = sum_trace(digits)
            q = "What is the sum of the numbers on the cards?" if kind == "sum" else f"What is {'+'.join(map(str, digits))}?"
            trace, answer = (f"{read}\n{steps}" if kind == "sum" else steps), total
        else:
            (ca, a), (cb, b) = rng.sample(cards, 2)
            q = f"What is the {ca} number times the {cb} number?" if kind == "product" else f"What is {a}*{b}?"
            trace, answer = (f"{read}\n{a}*{b}={a * b}" if kind == "product" else f"{a}*{b}={a * b}"), a * b
        prompt = f"The cards show {read}.\n{q}" if kind in ("sum", "product") else q
        yield Sample(f"text-{seed}-{i}", [{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": think_answer(trace, str(answer))}],
                     [], {"task": f"text_{kind}", "answer": str(answer)})


def reasoning_text(n: int, seed: int, max_cards: int = 3, leaks: Leaks | None = None) -> list[Sample]:
    """Stage 0 corpus for the decoder: the cards' reasoning tasks with the reading given in words,
    and bare arithmetic, every answer reasoned in a trace; none for which `leaks` is true."""
    return take_excluding(_text_samples(seed, max_cards), n, leaks)


def _caption_pairs(seed: int, d: Difficulty) -> Iterator[tuple[bytes, str]]:
    rng = random.Random(seed)
    while True:
        scene = cards_scene(rng, d)
        yield png_bytes(draw_cards(scene)), reading(scene)


def caption_pairs(n: int, seed: int, d: Difficulty, leaks: Callable[[bytes], bool] | None = None) -> list[tuple[bytes, str]]:
    """(PNG, reading) pairs for contrastive pretraining of the vision encoder; none whose image `leaks`."""
    return take_excluding(_caption_pairs(seed, d), n, None if leaks is None else lambda pair: leaks(pair[0]))


def caption_samples(pairs: list[tuple[bytes, str]], name: str) -> list[Sample]:
    """Caption pairs as samples (to be saved with the run's data and read back)."""
    return [Sample(f"{name}-{i}", [{"role": "user", "content": IMAGE_TOKEN}, {"role": "assistant", "content": caption}],
                   [png], {"task": "caption_pair", "answer": caption}) for i, (png, caption) in enumerate(pairs)]


def alignment_samples(n: int, seed: int, d: Difficulty, leaks: Callable[[bytes], bool] | None = None) -> list[Sample]:
    return [
        Sample(f"align-{seed}-{i}", [{"role": "user", "content": f"{IMAGE_TOKEN}\n{LIST_QUESTION}"},
                                     {"role": "assistant", "content": caption}], [png], {"task": "card_list", "answer": caption})
        for i, (png, caption) in enumerate(caption_pairs(n, seed, d, leaks))
    ]


def _stage3_samples(seed: int, d: Difficulty, refusal_share: float) -> Iterator[Sample]:
    rng = random.Random(seed)
    for i in itertools.count():
        if rng.random() < refusal_share:
            messages = [{"role": "user", "content": rng.choice(HARMFUL)}, {"role": "assistant", "content": REFUSAL}]
            yield Sample(f"s3-{seed}-{i}", messages, [], {"task": "refusal", "answer": REFUSAL})
            continue
        scenes = [cards_scene(rng, d) for _ in range(2)]
        k = rng.randrange(2)
        card = rng.choice(scenes[k]["cards"])
        q = f"What number is on the {card['place']} card in image {k + 1}?"
        present = [c for c in scenes[1 - k]["cards"] if c["place"] == card["place"]]
        messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n{q}"},
                    {"role": "assistant", "content": str(card["digit"])}]
        meta = {"task": "card_pair", "kind": "perception", "mode": "nothink", "answer": str(card["digit"]),
                "answer_type": "number", "distractor": bool(present)}
        yield Sample(f"s3-{seed}-{i}", messages, [png_bytes(draw_cards(sc)) for sc in scenes], meta)


def stage3_samples(n: int, seed: int, d: Difficulty, refusal_share: float = 0.2, leaks: Leaks | None = None) -> list[Sample]:
    """Two-image questions (which image, which card) and refusals of harmful requests; none that `leaks`
    (refusals are text-only: a registered prompt leaks)."""
    return take_excluding(_stage3_samples(seed, d, refusal_share), n, leaks)


def as_mode(s: Sample, mode: str) -> Sample:
    """The same cards sample answered in `mode`: a direct answer gets a trace made of the reading
    (think), a trace is dropped down to the final answer (nothink)."""
    meta = s.meta
    if mode == meta["mode"]:
        return s
    answer = str(meta["answer"])
    text = think_answer(meta["reading"], answer) if mode == "think" else answer
    return Sample(s.id, [*s.messages[:-1], {"role": "assistant", "content": text}], s.images, {**meta, "mode": mode})


def plant_defect(s: Sample, rng: random.Random) -> Sample:
    """A data bug of the kind curation exists for: a wrong final answer (any trace is left as it was)."""
    answer = str(s.meta["answer"])
    if answer.isdigit():
        wrong = str(int(answer) + rng.choice((-2, -1, 1, 2)) if int(answer) > 2 else int(answer) + rng.randint(1, 3))
    else:
        wrong = rng.choice([p for p in PLACES[:3] if p != answer])
    text = s.messages[-1]["content"]
    text = re.sub(rf"{re.escape(answer)}$", wrong, text)
    return Sample(s.id, [*s.messages[:-1], {"role": "assistant", "content": text}], s.images, s.meta)


def task_samples(tasks: tuple[str, ...], n: int, seed: int, d: Difficulty) -> list[Sample]:
    from phi4rv.data.synth.writer import generate_many

    return list(generate_many(list(tasks), n, seed, d, progress=False))
