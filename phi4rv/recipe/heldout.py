"""The recipe's held-out registry: every image (by decoded pixels) and every text-only prompt of its
evaluation sets (stage 2's held-out and validation splits, stage 0's held-out text), which no
training stage may contain.

The card world is small (a few thousand distinct images, a few hundred distinct readings in
words), so sets drawn independently share samples: without the registry 5% of the held-out
images were in stage 1 or 3 training data and 81% of stage 0's held-out prompts in its corpus.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from phi4rv.data.formats import Sample
from phi4rv.data.mix import image_key

T = TypeVar("T")


def prompt_key(s: Sample) -> str:
    """A sample's user text, whitespace-normalised and lower-cased."""
    return " ".join(" ".join(m["content"] for m in s.messages if m["role"] == "user").lower().split())


class HeldOut:
    def __init__(self, images: Iterable[str] = (), prompts: Iterable[str] = ()):
        self.images, self.prompts = set(images), set(prompts)

    def add(self, samples: Iterable[Sample]) -> HeldOut:
        """Register samples: their images; a text-only sample by its prompt."""
        for s in samples:
            if s.images:
                self.images.update(image_key(ref) for ref in s.images)
            else:
                self.prompts.add(prompt_key(s))
        return self

    def holds_image(self, png: bytes) -> bool:
        return image_key(png) in self.images

    def holds(self, s: Sample) -> bool:
        """Whether a training sample would leak: one of its images, or (text-only) its prompt, is registered."""
        if s.images:
            return any(self.holds_image(ref) for ref in s.images)
        return prompt_key(s) in self.prompts

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"images": sorted(self.images), "prompts": sorted(self.prompts)}) + "\n")

    @classmethod
    def load(cls, path: Path) -> HeldOut:
        d = json.loads(path.read_text())
        return cls(d["images"], d["prompts"])


def take_excluding(items: Iterator[T], n: int, leaks: Callable[[T], bool] | None, max_tries: int = 20) -> list[T]:
    """The first n of `items` that do not leak; at most `max_tries * n` draws, so a registry that
    covers the whole world fails loudly instead of looping."""
    out: list[T] = []
    for k, item in enumerate(items):
        if len(out) == n:
            break
        if k >= max_tries * max(1, n):
            raise RuntimeError(f"only {len(out)} of {n} samples drawn outside the held-out registry in {k} tries")
        if leaks is None or not leaks(item):
            out.append(item)
    return out
