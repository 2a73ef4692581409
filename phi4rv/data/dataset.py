"""Samples -> training examples: token ids, next-token targets (assistant spans only) and image patches.

The loss mask comes from the chat template's generation blocks (`encode_chat`), never from string
arithmetic, and direct answers get the nothink marker before rendering (`mark_nothink`). Targets are
shifted here, per sample, so packing several samples into one row can never make one sample
predict the first token of the next.

A sample that cannot be used is skipped with a reason and counted (`SKIP_REASONS`); nothing is
trained on silently. Lengths are computed from image headers, without decoding pixels, so a whole
dataset can be measured (for packing and step counts) cheaply before training starts.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phi4rv.data.formats import Sample, mark_nothink, mode_of
from phi4rv.processing.chat import encode_chat
from phi4rv.processing.image import ImageError, ImageProcessorConfig, image_size, naflex_size, process_image
from phi4rv.processing.tokenizer import Tokenizer
from phi4rv.processing.tokens import IGNORE_INDEX, IMAGE_TOKEN_ID, expand_image_tokens

Grid = tuple[int, int]

SKIP_REASONS = {
    "missing_image": "an image file does not exist",
    "bad_image": "an image cannot be decoded",
    "image_count": "the number of <image> tags differs from the number of images",
    "too_long": "longer than max_len tokens once images are expanded",
    "no_answer": "no assistant tokens to learn from",
    "bad_sample": "the messages cannot be rendered by the chat template",
}


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Example:
    """One sample ready to batch. `input_ids` has each image expanded to its h*w placeholders."""

    id: str
    input_ids: list[int]
    targets: list[int]  # targets[i] = the token position i must predict, or IGNORE_INDEX
    grids: list[Grid]
    images: list  # the sample's image refs (paths or bytes), decoded by `SampleEncoder.load_pixels`
    mode: str  # "think" | "nothink" (of the first answer)
    pixels: list[torch.Tensor] | None = None  # [h*w, C*p*p] per image, once loaded

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


def _image_size(ref) -> tuple[int, int]:
    """(height, width) of an image as `load_image` will see it, header only."""
    if not isinstance(ref, (bytes, bytearray)) and not Path(ref).is_file():
        raise SkipSample("missing_image", str(ref))
    try:
        w, h = image_size(ref)
    except ImageError as e:
        raise SkipSample("bad_image", str(e)) from None
    return h, w


def sample_mode(sample: Sample) -> str:
    answers = sample.answers()
    return mode_of(answers[0]) if answers else "nothink"


@dataclass
class SampleEncoder:
    """Turns `Sample`s into `Example`s with one tokenizer, chat template and image setting."""

    tokenizer: Tokenizer
    image_cfg: ImageProcessorConfig
    max_len: int
    template: str | None = None  # default: the tokenizer's own template

    def messages(self, sample: Sample) -> list[dict]:
        return [
            {**m, "content": mark_nothink(m["content"])} if m["role"] == "assistant" else m for m in sample.messages
        ]

    def encode(self, sample: Sample) -> Example:
        """Token ids and targets; images are measured, not decoded. Raises SkipSample."""
        if sample.num_image_tags != len(sample.images):
            raise SkipSample("image_count", f"{sample.num_image_tags} tags, {len(sample.images)} images")
        grids = []
        for ref in sample.images:
            h, w = _image_size(ref)
            H, W = naflex_size(h, w, self.image_cfg)
            grids.append((H // self.image_cfg.patch_size, W // self.image_cfg.patch_size))
        try:
            enc = encode_chat(self.tokenizer, self.messages(sample), add_generation_prompt=False, template=self.template)
        except Exception as e:  # a template error names the problem; the sample is unusable either way
            raise SkipSample("bad_sample", str(e)) from None
        if enc.num_images != len(grids):  # e.g. an <image> tag inside the template's own text
            raise SkipSample("image_count", f"{enc.num_images} tags rendered, {len(grids)} images")
        labels = [t if m else IGNORE_INDEX for t, m in zip(enc.input_ids, enc.assistant_mask)]
        ids = expand_image_tokens(enc.input_ids, grids)
        if len(ids) > self.max_len:
            raise SkipSample("too_long", f"{len(ids)} > {self.max_len} tokens")
        labels = expand_image_tokens_like(enc.input_ids, labels, grids)
        targets = labels[1:] + [IGNORE_INDEX]
        if all(t == IGNORE_INDEX for t in targets):
            raise SkipSample("no_answer")
        return Example(sample.id, ids, targets, grids, list(sample.images), sample_mode(sample))

    def load_pixels(self, ex: Example) -> Example:
        """Decode the example's images into patches (in place). Raises SkipSample."""
        pixels = []
        for ref, grid in zip(ex.images, ex.grids):
            try:
                patches = process_image(ref, self.image_cfg)
            except ImageError as e:
                raise SkipSample("bad_image", str(e)) from None
            if patches.grid != grid:  # header and decoded image disagree: a broken file
                raise SkipSample("bad_image", f"size changed on decoding ({grid} -> {patches.grid})")
            pixels.append(patches.pixels)
        ex.pixels = pixels
        return ex


def expand_image_tokens_like(ids: list[int], values: list[int], grids: list[Grid]) -> list[int]:
    """Expand `values` (aligned with `ids`) the way `expand_image_tokens` expands `ids`; image
    positions get IGNORE_INDEX."""
    out: list[int] = []
    images = iter(grids)
    for t, v in zip(ids, values):
        if t == IMAGE_TOKEN_ID:
            h, w = next(images)
            out.extend([IGNORE_INDEX] * (h * w))
        else:
            out.append(v)
    return out


# ---- a measured dataset and the mixture ------------------------------------------------------


@dataclass
class Source:
    """One dataset file, read and measured: `lengths[i]` is None for a skipped sample."""

    name: str
    samples: list[Sample]
    lengths: list[int | None]
    modes: list[str]
    weight: float = 1.0
    skipped: Counter = field(default_factory=Counter)

    @classmethod
    def measure(cls, name: str, samples: list[Sample], encoder: SampleEncoder, weight: float = 1.0) -> Source:
        lengths: list[int | None] = []
        modes, skipped = [], Counter()
        for s in samples:
            try:
                lengths.append(len(encoder.encode(s)))
            except SkipSample as e:
                lengths.append(None)
                skipped[e.reason] += 1
            modes.append(sample_mode(s))
        return cls(name, samples, lengths, modes, weight, skipped)

    @property
    def usable(self) -> list[int]:
        return [i for i, n in enumerate(self.lengths) if n is not None]


def mixture_order(sources: Sequence[Source], seed: int, epoch: int, think_ratio: float | None = None, shuffle: bool = True) -> list[tuple[int, int]]:
    """One epoch of the mixture as (source, sample) pairs, a pure function of its arguments.

    A source's `weight` is how many times its usable samples appear per epoch: 1 = once, 2 = twice,
    0.5 = a random half. With `think_ratio`, the epoch keeps its size but is redrawn so that this
    fraction of it is reasoning (`<think>`) samples, cycling through a pool when it is too small.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order: list[tuple[int, int]] = []
    for k, src in enumerate(sources):
        usable = src.usable
        whole, frac = divmod(src.weight, 1.0)
        for _ in range(int(whole)):
            order += [(k, i) for i in usable]
        order += [(k, i) for i in rng.sample(usable, round(frac * len(usable)))]
    if think_ratio is not None:
        think = [p for p in order if sources[p[0]].modes[p[1]] == "think"]
        direct = [p for p in order if sources[p[0]].modes[p[1]] != "think"]
        n_think = round(think_ratio * len(order))
        order = _draw(think, n_think, rng) + _draw(direct, len(order) - n_think, rng)
    if shuffle:
        rng.shuffle(order)
    return order


def _draw(pool: list, n: int, rng: random.Random) -> list:
    if n and not pool:
        raise ValueError("think_ratio asks for samples of a kind the data does not have")
    pool = pool[:]
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]
