"""What every generator shares: difficulty knobs, fonts, colours, number and box formatting, and
the step that turns a drawn scene into a `Sample` that keeps the contract of `synth/__init__.py`."""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import Any

from PIL import Image, ImageFont

from phi4rv.data.formats import Sample
from phi4rv.processing.chat import IMAGE_TOKEN
from phi4rv.processing.reasoning import THINK_END, THINK_START


@dataclass(frozen=True)
class Difficulty:
    """Knobs every generator reads; ranges are inclusive `(lo, hi)` drawn per sample."""

    name: str = "default"
    width: tuple[int, int] = (448, 896)  # image width in pixels (portrait layouts swap width and height)
    height: tuple[int, int] = (336, 672)
    font_size: tuple[int, int] = (12, 18)  # font size (em) in pixels
    elements: tuple[int, int] = (3, 8)  # bars, rows, widgets, shapes, frames ...
    max_value: int = 100  # largest number drawn in charts and tables
    value_labels: float = 0.5  # chance that a chart prints its values (else read them off the axis)
    decimals: float = 0.0  # chance that prices/values carry two decimals
    grid: int = 0  # cards: snap sizes and places to multiples of this many pixels (0 = anywhere)

    def pick(self, rng: random.Random, knob: str) -> int:
        lo, hi = getattr(self, knob)
        return rng.randint(lo, hi)


DIFFICULTIES: dict[str, Difficulty] = {
    # Small images, few elements, big text: learnable by a ~10M-parameter model on a CPU.
    "tiny": Difficulty("tiny", width=(112, 160), height=(112, 160), font_size=(12, 14), elements=(2, 3),
                       max_value=20, value_labels=1.0, decimals=0.0),
    "default": Difficulty(),
    "hard": Difficulty("hard", width=(800, 1280), height=(600, 960), font_size=(10, 14), elements=(6, 12),
                       max_value=1000, value_labels=0.2, decimals=0.5),
}


def get_difficulty(d: Difficulty | str) -> Difficulty:
    if isinstance(d, Difficulty):
        return d
    if d not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {d!r} (choose from {', '.join(DIFFICULTIES)})")
    return DIFFICULTIES[d]


def difficulty_of(meta: dict[str, Any]) -> Difficulty | None:
    """The difficulty a synthetic sample was drawn at, from its `meta` (`knobs`, else a preset's
    name); None when neither is there."""
    knobs = meta.get("knobs")
    if isinstance(knobs, dict):
        try:
            return Difficulty(name=str(meta.get("difficulty", "custom")),
                              **{k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()})
        except TypeError:
            return None
    return DIFFICULTIES.get(str(meta.get("difficulty")))


def with_knobs(d: Difficulty | str, **knobs: Any) -> Difficulty:
    """A preset with some knobs changed; its name gets a `*` (samples record it in `meta["difficulty"]`)."""
    base = get_difficulty(d)
    knobs.setdefault("name", base.name.rstrip("*") + "*")
    return replace(base, **knobs)


# ---- drawing helpers -------------------------------------------------------------------------

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
TEXT = (20, 20, 20)
GRID = (200, 200, 200)

# Named, well-separated colours: charts, legends, shapes and captions refer to them by name.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "blue": (31, 119, 180),
    "green": (44, 160, 44),
    "orange": (255, 127, 14),
    "purple": (148, 103, 189),
    "brown": (140, 86, 75),
    "pink": (227, 119, 194),
    "gray": (127, 127, 127),
    "olive": (188, 189, 34),
    "cyan": (23, 190, 207),
}


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font (no download); `size` is the em size in pixels."""
    return ImageFont.load_default(size=size)


def text_size(text: str, size: int) -> tuple[int, int]:
    l, t, r, b = font(size).getbbox(text)
    return r - l, b - t


def text_box(xy: tuple[int, int], text: str, size: int, anchor: str = "la") -> list[int]:
    """Pixel box `[x1, y1, x2, y2]` (end exclusive) that `text` covers when drawn at `xy`."""
    l, t, r, b = font(size).getbbox(text, anchor=anchor)
    return [int(xy[0] + l), int(xy[1] + t), int(xy[0] + r), int(xy[1] + b)]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def fmt_num(x: float) -> str:
    """Numbers as a person writes them: 13, 3.5, 12.25 (no trailing zeros, no thousands separator)."""
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.2f}".rstrip("0").rstrip(".")


def fmt_money(x: float) -> str:
    return f"{x:.2f}"


def frac_box(box: list[int] | tuple[int, ...], width: int, height: int) -> list[float]:
    x1, y1, x2, y2 = box
    return [round(x1 / width, 4), round(y1 / height, 4), round(x2 / width, 4), round(y2 / height, 4)]


def fmt_box(box: list[float]) -> str:
    """The grounding contract (DESIGN.md §3): `[x1, y1, x2, y2]`, fractions with 4 decimals."""
    return "[" + ", ".join(f"{v:.4f}" for v in box) + "]"


def choice_letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def fmt_choices(options: list[str]) -> str:
    return "\n".join(f"{letter}. {opt}" for letter, opt in zip(choice_letters(len(options)), options))


WORDS = (
    "apple pear plum fig kiwi lime lemon mango peach grape melon cherry date olive "
    "north south east west alpha beta gamma delta omega sigma "
    "oak pine elm ash birch cedar maple willow "
    "iron gold tin zinc lead copper silver nickel"
).split()


def words(rng: random.Random, n: int, max_len: int = 8) -> list[str]:
    pool = [w.capitalize() for w in WORDS if len(w) <= max_len]
    return rng.sample(pool, n)


# ---- scene -> Sample -------------------------------------------------------------------------


@dataclass
class Drawn:
    """What a generator function returns: the images, the question and its exact answer, and the
    scene the images were drawn from. `trace` (the step-by-step reasoning) makes it a think sample."""

    images: list[Image.Image]
    question: str
    answer: str
    answer_type: str  # number | text | choice | box | order
    scene: dict[str, Any]
    trace: str | None = None
    choices: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


GenFn = Callable[[random.Random, Difficulty], Drawn]


@dataclass(frozen=True)
class Generator:
    """One task. `generate(seed, difficulty)` is pure: the same seed gives the same bytes."""

    name: str  # the task, e.g. "chart_value"
    family: str  # the module it lives in, e.g. "charts"
    kind: str  # "perception" (direct answer) or "reasoning" (multi-step, think trace)
    fn: GenFn
    description: str = ""

    def generate(self, seed: int, difficulty: Difficulty | str = "default") -> Sample:
        d = get_difficulty(difficulty)
        drawn = self.fn(random.Random(seed), d)
        return to_sample(self, seed, d, drawn)


def to_sample(gen: Generator, seed: int, d: Difficulty, drawn: Drawn) -> Sample:
    think = drawn.trace is not None
    if think != (gen.kind == "reasoning"):
        raise AssertionError(f"{gen.name}: a {gen.kind} task must {'not ' if not think else ''}have a trace")
    user = IMAGE_TOKEN + "\n"
    user = user * len(drawn.images) + drawn.question
    answer = f"{THINK_START}\n{drawn.trace}\n{THINK_END}\n\n{drawn.answer}" if think else drawn.answer
    meta: dict[str, Any] = {
        "task": gen.name,
        "kind": gen.kind,
        "mode": "think" if think else "nothink",
        "answer": drawn.answer,
        "answer_type": drawn.answer_type,
        "scene": drawn.scene,
        "seed": seed,
        "generator": gen.family,
        "difficulty": d.name,
        "knobs": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(d).items() if k != "name"},
        "source": "synth",
    }
    if drawn.choices is not None:
        meta["choices"] = drawn.choices
    meta.update(drawn.extra)
    return Sample(
        id=f"{gen.name}-{seed}",
        messages=[{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        images=[png_bytes(im) for im in drawn.images],
        meta=meta,
    )
