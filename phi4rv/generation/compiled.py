"""`torch.compile` of the one-token decode step (`--compile`; prefill stays eager).

Shapes are kept compile-friendly so that a model compiles a bounded number of times, not once
per token: the step attends over the first `attended` positions of its slots with a length mask
(as gpt-fast attends over its whole cache), a power of two that changes a few times in a
sequence's life, not at every token; that length, the batch (how many slots run) and the slot
length are marked dynamic, so sequences joining and leaving the server's batch, or a new prompt
length in chat, reuse the same graph. Batch 1 gets a graph of its own (torch specialises sizes 0
and 1): two graphs cover every batch size and length. The step takes views of the `SlotCache`
tensors (one call per run of consecutive slots; `Core` keeps the running slots consecutive),
writes the new token's keys/values into them in place and returns the LM head's logits; picking
the token stays in Python (`core.pick`). In bf16/fp16 the compiled step rounds where eager rounds
(`emulate_precision_casts`); its sums still run in another order, so a near-tie can flip a token.

Nothing in the step is CPU-only: the weight-only kernels pick their CUDA variants by the
activations' device, SDPA is device-generic, and the compile mode is the caller's
(`reduce-overhead`, CUDA graphs, is the mode to try on a GPU; untested here, see README).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from phi4rv.generation.cache import SlotCache

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str | bool | None) -> str | None:
    """None/False = eager; True = "default"; else one of COMPILE_MODES."""
    if mode in (None, False, "", "none"):
        return None
    if mode is True:
        return "default"
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    return mode


class SlotViews:
    """The decoder's cache calls over the bound slots (views of the cache): `update` writes one
    new position per row in place and returns the first `span` positions (a length set by
    `attended`, not by the step)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], positions: torch.Tensor, span: int):
        self.k, self.v, self.positions, self.span = k, v, positions, span

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [B, kv_heads, 1, head_dim]; the slots: [B, kv_heads, slot_len, head_dim]
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[layer][rows, :, self.positions] = k[:, :, 0]
        self.v[layer][rows, :, self.positions] = v[:, :, 0]
        return self.k[layer][:, :, : self.span], self.v[layer][:, :, : self.span]

    def advance(self, n: int) -> None:
        pass  # lengths are the SlotCache's, advanced by the caller


def attended(end: int, slot_len: int) -> int:
    """Positions a step attends over when its longest row ends at `end`: a power of two of at
    least 256 (few shapes, for CUDA graphs' sake) and at most the slot. Attending over the whole
    slot would read a server's (context-long) slots in full at every token."""
    return min(slot_len, max(256, 1 << (end - 1).bit_length()))


def consecutive_runs(slots: list[int]) -> list[tuple[int, int]]:
    """(start, end) indices into `slots` of its runs of consecutive slot numbers."""
    runs, start = [], 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            runs.append((start, i))
            start = i
    return runs


class CompiledDecode:
    """One decode step of `decoder`, compiled once per batch-size class (1, or more) with `mode`."""

    def __init__(self, decoder: nn.Module, mode: str = "default"):
        self.decoder, self.mode, self.enabled = decoder, mode, True
        # Eager's roundings kept in bf16/fp16 (inductor would otherwise keep fused intermediates in
        # fp32): on one tiny-model prompt the first greedy difference came after 20 tokens, not 11.
        options = {**torch._inductor.list_mode_options(mode), "emulate_precision_casts": True}
        self.cuda_graphs = bool(options.get("triton.cudagraphs"))
        # Every model's step is this one method: its graphs are its own, not counted against another model's limit.
        self.step = torch.compile(self._forward, options=options, fullgraph=True, isolate_recompiles=True)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, span: torch.Tensor,
                 k: list[torch.Tensor], v: list[torch.Tensor]) -> torch.Tensor:
        visible = span[None, :] <= positions[:, None]  # [B, S]; span: arange(S), its length dynamic
        x = self.decoder.embed_tokens(tokens[:, None])
        h = self.decoder(x, positions[:, None], visible[:, None, None, :], SlotViews(k, v, positions, span.shape[0]))
        return self.decoder.lm_head(h[:, -1])

    def __call__(self, tokens: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        """[B] tokens for the slots bound in `cache` -> [B, V] logits; the slots advance by one.
        Each run of consecutive slots is one call on views of the cache (`Core` keeps the running
        slots consecutive), so nothing is gathered."""
        end = max(cache.lengths[s] for s in cache.slots) + 1
        if end > cache.slot_len:
            raise ValueError(f"KV cache slot full: {end} > {cache.slot_len} positions")
        span = torch.arange(attended(end, cache.slot_len), device=tokens.device)
        logits = []
        for a, b in consecutive_runs(cache.slots):
            first = cache.slots[a]
            k = [t[first : first + b - a] for t in cache.k]
            v = [t[first : first + b - a] for t in cache.v]
            run_tokens, positions = tokens[a:b], cache.starts[a:b]
            for t in (run_tokens, positions, span):
                torch._dynamo.maybe_mark_dynamic(t, 0)
            for t in k + v:
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, 2)
                # CUDA graphs may then write the cache in place (a mutated input must have a fixed
                # address); unguarded: a new cache re-records the graph instead of recompiling.
                torch._dynamo.mark_static_address(t, guard=False)
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed
            logits.append(self.step(run_tokens, positions, span, k, v))
        cache.advance(1)
        return logits[0] if len(logits) == 1 else torch.cat(logits)


_COMPILED: weakref.WeakKeyDictionary[nn.Module, CompiledDecode] = weakref.WeakKeyDictionary()


def compile_decode(model: nn.Module, mode: str | bool | None = "default") -> CompiledDecode | None:
    """Make every generation `Core` over `model` run its decode steps compiled (`mode=None`: eager
    again). The compiled step lives as long as the model, so later generate calls reuse it, and so
    does compiling again with the same mode after a spell of eager decoding."""
    mode = check_compile_mode(mode)
    current = _COMPILED.get(model)
    if mode is None:
        if current is not None:
            current.enabled = False
        return None
    if current is None or current.mode != mode:
        current = _COMPILED[model] = CompiledDecode(model.decoder, mode)
    current.enabled = True
    return current


def compiled_decode(model: nn.Module) -> CompiledDecode | None:
    current = _COMPILED.get(model)
    return current if current is not None and current.enabled else None
