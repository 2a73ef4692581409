"""`torch.compile` of the one-token decode step (`--compile`; prefill stays eager).

Shapes are kept compile-friendly so that a model compiles a bounded number of times, not once
per token: the step attends over each slot's whole preallocated length with a length mask (as
gpt-fast does), so the cache's shape does not grow with every token, and the batch (how many
slots run) and the slot length are marked dynamic, so sequences joining and leaving the server's
batch, or a new prompt length in chat, reuse the same graph. Batch 1 gets graphs of its own
(torch specialises sizes 0 and 1): at most three (batch 1 in a one-slot cache, batch 1 among more
slots, any larger batch) cover every batch size and slot length. The step writes the new token's
keys/values into the `SlotCache` tensors in place and returns the LM head's logits; picking the
token stays in Python (`core.pick`). In bf16/fp16 the compiled step rounds where eager rounds
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


class WholeSlots:
    """The decoder's cache calls over whole slots: `update` writes one new position per row and
    returns every position of the bound slots (a shape fixed by the slot length, not the step)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], rows: torch.Tensor, positions: torch.Tensor):
        self.k, self.v, self.rows, self.positions = k, v, rows, positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [B, kv_heads, 1, head_dim]; the cache: [slots, kv_heads, slot_len, head_dim]
        self.k[layer][self.rows, :, self.positions] = k[:, :, 0]
        self.v[layer][self.rows, :, self.positions] = v[:, :, 0]
        return self.k[layer][self.rows], self.v[layer][self.rows]

    def advance(self, n: int) -> None:
        pass  # lengths are the SlotCache's, advanced by the caller


class CompiledDecode:
    """One decode step of `decoder`, compiled once per batch-size class (1, or more) with `mode`."""

    def __init__(self, decoder: nn.Module, mode: str = "default"):
        self.decoder, self.mode = decoder, mode
        # Eager's roundings kept in bf16/fp16 (inductor would otherwise keep fused intermediates in
        # fp32): on one tiny-model prompt the first greedy difference came after 20 tokens, not 11.
        options = {**torch._inductor.list_mode_options(mode), "emulate_precision_casts": True}
        self.cuda_graphs = bool(options.get("triton.cudagraphs"))
        # Every model's step is this one method: its graphs are its own, not counted against another model's limit.
        self.step = torch.compile(self._forward, options=options, fullgraph=True, isolate_recompiles=True)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                 k: list[torch.Tensor], v: list[torch.Tensor]) -> torch.Tensor:
        slot_len = k[0].shape[2]
        visible = torch.arange(slot_len, device=positions.device)[None, :] <= positions[:, None]  # [B, S]
        x = self.decoder.embed_tokens(tokens[:, None])
        h = self.decoder(x, positions[:, None], visible[:, None, None, :], WholeSlots(k, v, rows, positions))
        return self.decoder.lm_head(h[:, -1])

    def __call__(self, tokens: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        """[B] tokens for the slots bound in `cache` -> [B, V] logits; the slots advance by one."""
        end = max(cache.lengths[s] for s in cache.slots) + 1
        if end > cache.slot_len:
            raise ValueError(f"KV cache slot full: {end} > {cache.slot_len} positions")
        for t in (tokens, cache.rows, cache.starts):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        for t in cache.k + cache.v:
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 2)
            # CUDA graphs may then write the cache in place (a mutated input must have a fixed
            # address); unguarded: a new cache re-records the graph instead of recompiling.
            torch._dynamo.mark_static_address(t, guard=False)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed
        logits = self.step(tokens, cache.starts, cache.rows, cache.k, cache.v)
        cache.advance(1)
        return logits


_COMPILED: weakref.WeakKeyDictionary[nn.Module, CompiledDecode] = weakref.WeakKeyDictionary()


def compile_decode(model: nn.Module, mode: str | bool | None = "default") -> CompiledDecode | None:
    """Make every generation `Core` over `model` run its decode steps compiled (`mode=None`: eager
    again). The compiled step lives as long as the model, so later generate calls reuse it."""
    mode = check_compile_mode(mode)
    if mode is None:
        _COMPILED.pop(model, None)
        return None
    current = _COMPILED.get(model)
    if current is None or current.mode != mode:
        current = _COMPILED[model] = CompiledDecode(model.decoder, mode)
    return current


def compiled_decode(model: nn.Module) -> CompiledDecode | None:
    return _COMPILED.get(model)
