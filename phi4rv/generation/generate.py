"""Batched, streaming generation with a KV cache, stop ids/strings and a thinking budget.

Prompts are left-padded into one batch and all their images are encoded together in one packed
vision call. Each decode step feeds one token per unfinished row; finished rows leave the batch
(their cache rows are dropped). Text-level state (stop strings, whether a row is inside
`<think>`) is tracked on the incrementally decoded text of each row.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from phi4rv.generation.sampling import SamplingParams, sample, token_logprobs
from phi4rv.model.vlm import Phi4RV, attention_mask, expand_image_tokens
from phi4rv.processing.chat import THINK_END, THINK_START
from phi4rv.processing.image import ImagePatches
from phi4rv.processing.tokenizer import StreamDecoder, Tokenizer

FORCED_CLOSE = "\n</think>\n\n"  # what a spent thinking budget makes the model write


@dataclass
class GenerationParams:
    max_new_tokens: int = 512
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    thinking_budget: int | None = None  # max tokens inside <think> before </think> is forced
    top_logprobs: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.thinking_budget is not None and self.thinking_budget < 0:
            raise ValueError(f"thinking_budget must be >= 0, got {self.thinking_budget}")


@dataclass
class Request:
    input_ids: list[int]  # prompt ids; IMAGE_TOKEN_ID once per image (not yet expanded)
    images: list[ImagePatches] = field(default_factory=list)
    thinking: bool = False  # the prompt already opened <think> (mode "think")


@dataclass
class TokenEvent:
    row: int
    token_id: int
    text: str  # new text made visible by this token (may be "")
    logprob: float
    top_logprobs: list[tuple[int, float]] | None
    thinking: bool  # this token was generated inside <think> … </think>
    finish_reason: str | None = None  # "stop" | "length" once the row is done


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    thinking_tokens: int = 0
    finish_reason: str | None = None


class SequenceState:
    """Text-level state of one sequence."""

    def __init__(self, tokenizer: Tokenizer, params: GenerationParams, thinking: bool):
        self.decoder = StreamDecoder(tokenizer)
        self.params = params
        self.text = ""
        self.emitted = 0
        self.thinking = thinking
        self.thinking_tokens = 0
        self.forced: list[int] = []
        self.holdback = max((len(s) for s in params.stop_strings), default=1) - 1
        self.n = 0

    def push(self, token: int, tokenizer: Tokenizer) -> tuple[str, bool, str | None]:
        """Account for `token`; returns (visible text delta, was thinking, finish reason)."""
        was_thinking = self.thinking
        self.n += 1
        if was_thinking:
            self.thinking_tokens += 1
        finish = None
        if token in self.params.stop_ids:
            finish = "stop"
        else:
            self.text += self.decoder.push(token)
            closed = THINK_END in self.text
            if not self.thinking and not closed and self.text.lstrip().startswith(THINK_START):
                self.thinking = True  # auto mode: the model chose to think
            elif self.thinking and closed:
                self.thinking = False
            cut = min((i for s in self.params.stop_strings if (i := self.text.find(s)) >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                finish = "stop"
        if finish is None and self.n >= self.params.max_new_tokens:
            finish = "length"
        if finish is None and self.thinking and not self.forced:
            budget = self.params.thinking_budget
            if budget is not None and self.thinking_tokens >= budget:
                self.forced = tokenizer.encode(FORCED_CLOSE)
        if finish is not None:
            if finish == "length" or token not in self.params.stop_ids:
                self.text += self.decoder.flush()
            end = len(self.text)
        else:
            end = max(self.emitted, len(self.text) - self.holdback)
        delta, self.emitted = self.text[self.emitted : end], end
        return delta, was_thinking, finish


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_batch(model: Phi4RV, requests: list[Request], pad_id: int):
    """Left-pad the expanded prompts; pack every image of the batch in order."""
    ids = [expand_image_tokens(r.input_ids, [im.grid for im in r.images]) for r in requests]
    longest = max(len(x) for x in ids)
    if longest == 0:
        raise ValueError("empty prompt")
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    valid = torch.zeros((len(ids), longest), dtype=torch.bool)
    for i, x in enumerate(ids):
        input_ids[i, longest - len(x) :] = torch.tensor(x, dtype=torch.long)
        valid[i, longest - len(x) :] = True
    images = [im for r in requests for im in r.images]
    pixels = torch.cat([im.pixels for im in images]) if images else None
    return input_ids.to(model.device), valid.to(model.device), pixels, [im.grid for im in images]


@torch.inference_mode()
def generate_stream(
    model: Phi4RV,
    tokenizer: Tokenizer,
    requests: list[Request],
    params: GenerationParams,
    timing: dict[str, float] | None = None,
) -> Iterator[list[TokenEvent]]:
    """Yields, at every decode step, one event per row that produced a token."""
    timing = timing if timing is not None else {}
    device = model.device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    input_ids, valid, pixels, grids = prepare_batch(model, requests, pad_id)
    b, t = input_ids.shape
    max_len = t + params.max_new_tokens + len(tokenizer.encode(FORCED_CLOSE))
    if max_len > model.cfg.decoder.max_position_embeddings:
        raise ValueError(
            f"prompt ({t} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
            f"{model.cfg.decoder.max_position_embeddings} positions"
        )

    t0 = time.perf_counter()
    feats = model.encode_images(pixels.to(device), grids) if grids else None
    _sync(device)
    timing["vision"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    padded = not bool(valid.all())
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = model.new_cache(b, max_len)
    h = model.decoder(model.embed(input_ids, feats), positions, attention_mask(valid, t) if padded else None, cache)
    logits = model.decoder.lm_head(h[:, -1])
    _sync(device)
    timing["prefill"] = time.perf_counter() - t0

    rows = [SequenceState(tokenizer, params, r.thinking) for r in requests]
    active = list(range(b))  # original row index of each batch row
    next_pos = positions[:, -1] + 1
    t0 = time.perf_counter()
    while True:
        tokens = sample(logits, params.sampling, generator)
        forced = [rows[r].forced.pop(0) if rows[r].forced else None for r in active]
        if any(f is not None for f in forced):
            tokens = torch.tensor([f if f is not None else int(x) for f, x in zip(forced, tokens)], device=device)
        chosen, top_v, top_i = token_logprobs(logits, tokens, params.top_logprobs)
        tok_list, lp_list = tokens.tolist(), chosen.tolist()
        events, keep = [], []
        for j, r in enumerate(active):
            text, was_thinking, finish = rows[r].push(tok_list[j], tokenizer)
            top = list(zip(top_i[j].tolist(), top_v[j].tolist())) if top_v is not None else None
            events.append(TokenEvent(r, tok_list[j], text, lp_list[j], top, was_thinking, finish))
            if finish is None:
                keep.append(j)
        yield events
        if not keep:
            break
        if len(keep) < len(active):
            idx = torch.tensor(keep, device=device)
            cache.select(idx)
            valid, tokens, next_pos = valid[idx], tokens[idx], next_pos[idx]
            active = [active[j] for j in keep]
            padded = not bool(valid.all())
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
        mask = attention_mask(valid, 1) if padded else None
        h = model.decoder(model.decoder.embed_tokens(tokens[:, None]), next_pos[:, None], mask, cache)
        logits = model.decoder.lm_head(h[:, -1])
        next_pos = next_pos + 1
    _sync(device)
    timing["decode"] = time.perf_counter() - t0


def generate(
    model: Phi4RV,
    tokenizer: Tokenizer,
    requests: list[Request],
    params: GenerationParams,
    timing: dict[str, float] | None = None,
) -> list[Generation]:
    out = [Generation() for _ in requests]
    for events in generate_stream(model, tokenizer, requests, params, timing):
        for e in events:
            g = out[e.row]
            g.token_ids.append(e.token_id)
            g.text += e.text
            g.logprobs.append(e.logprob)
            if e.top_logprobs is not None:
                g.top_logprobs.append(e.top_logprobs)
            g.thinking_tokens += e.thinking
            g.finish_reason = e.finish_reason
    return out
