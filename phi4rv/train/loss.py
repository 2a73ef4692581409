"""Cross-entropy over the LM head in chunks of tokens, never holding the `[tokens, vocab]` logits.

With Phi-4's 100,352-word vocabulary the logits of one 16k-token micro-batch are 6.4 GB in float32,
and autograd keeps them (and their softmax) until the backward pass. Here the forward computes each
chunk's logits, keeps only one log-sum-exp per token, and drops them; the backward recomputes each
chunk's logits once more and turns them straight into gradients (softmax - one-hot), so the peak
is one chunk's logits (chunk x vocab floats) instead of all of them, for one more head matmul.

`loss_terms` is the training loss of a batch: the model's forward (the model returns logits only),
then this (or, with chunking off, plain cross-entropy over the scored positions' logits).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from phi4rv.data.packing import Batch
from phi4rv.model.decoder import LMHead
from phi4rv.model.vlm import Phi4RV
from phi4rv.processing.tokens import IGNORE_INDEX, IMAGE_TOKEN_ID
from phi4rv.train.config import TrainConfig


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for s in range(0, n, chunk):
            logits = (hidden[s : s + chunk] @ weight.T).float()
            t = targets[s : s + chunk]
            lse[s : s + chunk] = logits.logsumexp(-1)
            loss += (lse[s : s + chunk] - logits.gather(1, t[:, None])[:, 0]).sum()
            correct += (logits.argmax(-1) == t).sum()
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # accumulated in the weight's dtype, in place (each chunk's matmul accumulates in float32;
        # a float32 buffer for a bf16 head would cost more memory than the chunking saves)
        grad_w = torch.zeros_like(weight) if need_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s : s + ctx.chunk]
            t = targets[s : s + ctx.chunk]
            probs = ((h @ weight.T).float() - lse[s : s + ctx.chunk, None]).exp_()  # softmax
            probs[torch.arange(len(t), device=t.device), t] -= 1.0
            d_logits = (probs * grad_loss).to(hidden.dtype)
            del probs
            if need_h:
                grad_h[s : s + ctx.chunk] = d_logits @ weight
            if need_w:
                grad_w.addmm_(d_logits.T, h)
            del d_logits
        return grad_h, grad_w, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over rows of -log softmax(hidden @ weight.T)[target], number of rows whose argmax is the
    target), as `F.cross_entropy(hidden @ weight.T, targets, reduction="sum")` with the logits in
    float32, but computed `chunk` rows at a time. hidden [N, D], weight [V, D], targets [N] (every
    row is scored). Under autocast the matmuls run in the autocast dtype, as `nn.Linear` would."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    with torch.autocast(device_type, enabled=False):
        return _ChunkedHeadCrossEntropy.apply(hidden, weight, targets, chunk)


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The run's compute precision: bfloat16 autocast, or nothing (the weights' dtype)."""
    if cfg.precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_terms(model: Phi4RV, batch: Batch, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of correct argmax predictions) over the batch's targets.

    With `chunk` > 0 the LM head and the loss run `chunk` scored tokens at a time
    (`chunked_cross_entropy`), never holding the whole [tokens, vocab] logits; 0 computes them at once."""
    # Under FSDP every process must run every sharded unit, in the same order, the same number of
    # times (each forward all-gathers a unit's parameters, each backward reduce-scatters its
    # gradients): a micro-batch without images (text only, a filler, samples dropped while
    # loading) still runs the vision tower, on a blank patch that adds exactly zero. One process
    # does the same, so that a step without images gives the vision tower zero gradients (AdamW
    # still moves it by its momentum) with any number of processes, not none.
    return scored_loss(model, batch.model_inputs(), batch.targets, chunk, always_run_vision=True)


def scored_loss(model: Phi4RV, inputs: dict, targets: torch.Tensor, chunk: int = 0,
                always_run_vision: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of correct argmax predictions) of the model's forward on
    `inputs`, where `targets` [B, T] (the next token at each position) is not IGNORE_INDEX."""
    scored = targets != IGNORE_INDEX
    targets = targets[scored]
    head = model.decoder.lm_head
    if chunk and isinstance(head, LMHead) and head.bias is None:
        hidden = model(**inputs, logits_at=scored, always_run_vision=always_run_vision, hidden_only=True)
        # inside the head's forward: under FSDP2 the head is its own unit, gathered around this call
        return head(hidden, apply=lambda h, w: chunked_cross_entropy(h, w, targets, chunk))
    logits = model(**inputs, logits_at=scored, always_run_vision=always_run_vision).float()  # [N, V]
    loss = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum()
    return loss, correct


def next_token_targets(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T] targets for `labels` aligned with `input_ids`: each position's target is the next
    label; the last position and image positions carry no loss."""
    labels = labels.masked_fill(input_ids == IMAGE_TOKEN_ID, IGNORE_INDEX)
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def mean_loss(model: Phi4RV, input_ids: torch.Tensor, labels: torch.Tensor, pixels: torch.Tensor | None = None,
              grids: list | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of unpadded rows (`labels` aligned with `input_ids`, as a
    causal LM's labels are; image positions are never scored)."""
    targets = next_token_targets(input_ids, labels)
    total, _ = scored_loss(model, {"input_ids": input_ids, "pixels": pixels, "grids": grids}, targets)
    return total / (targets != IGNORE_INDEX).sum()
