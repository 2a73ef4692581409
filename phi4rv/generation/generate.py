"""Batched, streaming generation for callers that hold the whole batch (chat, eval, training).

All requests are admitted into one `Core` at once (images encoded together, prompts prefilled
together); each decode step runs the rows still going, and finished rows leave the step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from phi4rv.generation.core import (
    FORCED_CLOSE,
    Core,
    GenerationParams,
    Request,
    Sequence,
    TokenEvent,
)
from phi4rv.model.vlm import Phi4RV
from phi4rv.processing.tokenizer import Tokenizer

__all__ = ["FORCED_CLOSE", "GenerationParams", "Request", "TokenEvent", "Generation", "generate", "generate_stream"]


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    thinking_tokens: int = 0
    finish_reason: str | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    if not requests:
        return
    slack = len(tokenizer.encode(FORCED_CLOSE))
    slot_len = max(r.prompt_len for r in requests) + params.max_new_tokens + slack
    if slot_len > model.cfg.decoder.max_position_embeddings:
        raise ValueError(
            f"prompt ({max(r.prompt_len for r in requests)} tokens) + max_new_tokens ({params.max_new_tokens}) "
            f"exceeds the model's {model.cfg.decoder.max_position_embeddings} positions"
        )
    core = Core(model, tokenizer, len(requests), slot_len)
    seqs = [Sequence(r, params, row=i) for i, r in enumerate(requests)]
    events = core.admit(seqs)
    _sync(model.device)
    timing.update(core.timing)
    t0 = time.perf_counter()
    yield events
    active = _running(core, seqs)
    while active:
        events = core.step(active)
        active = _running(core, active)
        yield events
    _sync(model.device)
    timing["decode"] = time.perf_counter() - t0


def _running(core: Core, seqs: list[Sequence]) -> list[Sequence]:
    """The unfinished sequences; the finished ones give their slots back (the rest close up)."""
    for s in seqs:
        if s.finished:
            core.release(s)
    return [s for s in seqs if not s.finished]


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
