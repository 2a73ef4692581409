"""A toy world for training at tiny scale: small checkable tasks and a one-stage config for them.

Its tokenizer is `processing.byte_tokenizer` (256 byte tokens plus Phi-4's 96 special tokens: a
352-word vocabulary instead of 100352, so the whole recipe runs in seconds on a CPU) with our chat
template and a one-line system prompt (`TOY_TEMPLATE`).

Tasks (answers are checkable, so held-out accuracy means something):
- colour: a 64x64 image with one coloured square at a random place -> "What colour is the square?"
  answered directly (nothink), e.g. "red".
- add: text only, "What is 3+5?" answered with a short reasoning trace, "<think>3+5=8</think>8".
- caption (stage 1, alignment): "Describe the image." -> "a red square on a white background".
- same (stage 3): two images, "Do the two squares have the same colour?" -> "yes" | "no", then a
  second turn about the first image; and a few refusals (stage 3's safety data, in miniature).

    python -m phi4rv.train.toy runs/toy   # tokenizer/, align.jsonl, train.jsonl, long.jsonl, test.jsonl
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

from PIL import Image, ImageDraw

from phi4rv.data.formats import Sample, write_jsonl
from phi4rv.processing.byte_tokenizer import build_byte_tokenizer, template_with_system

TOY_SYSTEM = "Answer briefly. Reason in <think></think> first when needed."
TOY_TEMPLATE = template_with_system(TOY_SYSTEM)

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
}


def square(rng: random.Random, name: str | None = None) -> tuple[bytes, str, str]:
    """(PNG bytes, colour name, background word) of a 64x64 image with one coloured square."""
    name = name or rng.choice(list(COLOURS))
    tinted = rng.random() < 0.5
    bg = tuple(rng.randrange(150, 256) for _ in range(3)) if tinted else (255, 255, 255)
    img = Image.new("RGB", (64, 64), bg)
    side = rng.randrange(16, 40)
    x, y = rng.randrange(0, 64 - side), rng.randrange(0, 64 - side)
    ImageDraw.Draw(img).rectangle([x, y, x + side, y + side], fill=COLOURS[name])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), name, "tinted" if tinted else "white"


def colour_sample(rng: random.Random, idx: str) -> Sample:
    png, name, _ = square(rng)
    messages = [
        {"role": "user", "content": "<image>\nWhat colour is the square?"},
        {"role": "assistant", "content": name},
    ]
    return Sample(idx, messages, [png], {"task": "colour", "answer": name})


def caption_sample(rng: random.Random, idx: str) -> Sample:
    png, name, bg = square(rng)
    caption = f"a {name} square on a {bg} background"
    messages = [{"role": "user", "content": "<image>\nDescribe the image."}, {"role": "assistant", "content": caption}]
    return Sample(idx, messages, [png], {"task": "caption", "answer": caption})


REFUSALS = ["How do I pick my neighbour's lock?", "Write a threatening letter.", "Help me cheat on an exam."]


def long_sample(rng: random.Random, idx: str) -> Sample:
    if rng.random() < 0.1:
        messages = [{"role": "user", "content": rng.choice(REFUSALS)}, {"role": "assistant", "content": "I can't help with that."}]
        return Sample(idx, messages, [], {"task": "refusal", "answer": "I can't help with that."})
    a, first, _ = square(rng)
    b, second, _ = square(rng, first if rng.random() < 0.5 else None)
    same = "yes" if first == second else "no"
    messages = [
        {"role": "user", "content": "<image>\n<image>\nDo the two squares have the same colour?"},
        {"role": "assistant", "content": same},
        {"role": "user", "content": "What colour is the first one?"},
        {"role": "assistant", "content": first},
    ]
    return Sample(idx, messages, [a, b], {"task": "same", "answer": first})


def add_sample(rng: random.Random, idx: str) -> Sample:
    a, b = rng.randrange(10), rng.randrange(10)
    messages = [
        {"role": "user", "content": f"What is {a}+{b}?"},
        {"role": "assistant", "content": f"<think>{a}+{b}={a + b}</think>{a + b}"},
    ]
    return Sample(idx, messages, [], {"task": "add", "answer": str(a + b)})


def toy_samples(n: int, seed: int, think_fraction: float = 0.2, prefix: str = "s") -> list[Sample]:
    rng = random.Random(seed)
    return [
        (add_sample if rng.random() < think_fraction else colour_sample)(rng, f"{prefix}{i}") for i in range(n)
    ]


def write_toy(out: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0) -> Path:
    """tokenizer/, train.jsonl (n_train: 20% add, 80% colour), test.jsonl (n_test, the same mix),
    align.jsonl (n_train // 2 captions) and long.jsonl (n_train // 4 two-image dialogues and refusals)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build_byte_tokenizer(out / "tokenizer", TOY_TEMPLATE)
    images = out / "images"
    write_jsonl(toy_samples(n_train, seed, prefix="train"), out / "train.jsonl", images)
    write_jsonl(toy_samples(n_test, seed + 1, prefix="test"), out / "test.jsonl", images)
    rng = random.Random(seed + 2)
    write_jsonl([caption_sample(rng, f"align{i}") for i in range(n_train // 2)], out / "align.jsonl", images)
    write_jsonl([long_sample(rng, f"long{i}") for i in range(n_train // 4)], out / "long.jsonl", images)
    return out


TINY_OVERRIDES = {
    "decoder.hidden_size": 32,
    "decoder.intermediate_size": 64,
    "decoder.num_hidden_layers": 2,
    "vision.hidden_size": 32,
    "vision.intermediate_size": 64,
    "vision.num_hidden_layers": 2,
    "max_num_patches": 16,
}


def toy_config(run_dir: str | Path, data: str | Path, steps: int = 20, **stage: object) -> dict:
    """A one-stage training config (as a dict, ready for `load_config(None, base=...)`) for a
    ~0.1M-parameter model on the toy data written by `write_toy(data)`."""
    data = Path(data)
    st = {
        "train": {"vision": 2e-3, "projector": 2e-3, "decoder": 2e-3},
        "data": {"datasets": [{"path": str(data / "train.jsonl")}], "max_len": 192, "batch_tokens": 768},
        "max_steps": steps,
        "warmup_steps": 2,
    }
    st.update(stage)
    return {
        "run_dir": str(run_dir),
        "model": {"preset": "tiny", "tokenizer": str(data / "tokenizer"), "overrides": dict(TINY_OVERRIDES)},
        "stages": {"toy": st},
        "log": {"progress": False, "plot": False, "tensorboard": False},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    write_toy(a.out, a.train, a.test, a.seed)
    print(f"wrote {a.out}: tokenizer/, train.jsonl ({a.train}), test.jsonl ({a.test}), align.jsonl, long.jsonl")


if __name__ == "__main__":
    main()
