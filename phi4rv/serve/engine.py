"""Continuous batching: requests join and leave the running batch at every decode step.

The KV memory is a fixed set of slots (`SlotCache`), each holding one sequence at its own
length. One background thread owns the model: at each iteration it admits queued requests into
free slots (their images encoded together in one packed vision call, then one prefill each),
runs one decode step for every active slot, and hands each token to its request's callback.
Finished, cancelled and timed-out requests free their slot at the next step.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from phi4rv.config import DecoderConfig
from phi4rv.generation.generate import FORCED_CLOSE, GenerationParams, Request, SequenceState, TokenEvent
from phi4rv.generation.sampling import sample, token_logprobs
from phi4rv.model.vlm import Phi4RV, attention_mask, expand_image_tokens, image_segment_ids
from phi4rv.processing.tokenizer import Tokenizer


class QueueFull(Exception):
    pass


class SlotCache:
    """Keys/values for `slots` independent sequences: [slots, kv_heads, slot_len, head_dim] per layer.

    Before a forward pass the engine `bind`s the slots it runs; `update` writes each row at its
    own length and returns the keys/values up to the longest bound sequence.
    """

    def __init__(self, cfg: DecoderConfig, slots: int, slot_len: int, device, dtype):
        shape = (slots, cfg.num_key_value_heads, slot_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.lengths = [0] * slots
        self.slot_len = slot_len
        self.device = device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def bind(self, slots: list[int]) -> None:
        self.rows = torch.tensor(slots, device=self.device)
        self.starts = torch.tensor([self.lengths[s] for s in slots], device=self.device)
        self.slots = slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        pos = self.starts[:, None] + torch.arange(t, device=self.device)  # [B, T]
        rows = self.rows[:, None]
        self.k[layer][rows, :, pos] = k.transpose(1, 2)
        self.v[layer][rows, :, pos] = v.transpose(1, 2)
        end = max(self.lengths[s] for s in self.slots) + t
        return self.k[layer][self.rows, :, :end], self.v[layer][self.rows, :, :end]

    def advance(self, n: int) -> None:
        for s in self.slots:
            self.lengths[s] += n

    def decode_mask(self) -> torch.Tensor | None:
        """[B, 1, 1, S] for one new token per bound slot; None when every row has the same length."""
        lengths = self.starts + 1
        if bool((lengths == lengths[0]).all()):
            return None
        k_pos = torch.arange(int(lengths.max()), device=self.device)
        return (k_pos[None, :] < lengths[:, None])[:, None, None, :]


@dataclass
class EngineRequest:
    request: Request
    params: GenerationParams
    emit: Callable[[TokenEvent | BaseException], None]  # called from the engine thread
    timeout: float | None = None
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # engine state
    slot: int = -1
    state: SequenceState | None = None
    generator: torch.Generator | None = None
    token: int = 0

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def prompt_len(self) -> int:
        return sum(im.grid[0] * im.grid[1] - 1 for im in self.request.images) + len(self.request.input_ids)


class Engine:
    def __init__(
        self,
        model: Phi4RV,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        slot_len: int | None = None,
        on_step: Callable[[int], None] | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_queue = max_queue
        dcfg = model.cfg.decoder
        self.slot_len = slot_len or min(model.cfg.max_length, dcfg.max_position_embeddings)
        self.cache = SlotCache(dcfg, max_batch, self.slot_len, model.device, model.dtype)
        self.slack = len(tokenizer.encode(FORCED_CLOSE))  # room for a forced </think>
        self.free = list(range(max_batch))[::-1]
        self.queue: deque[EngineRequest] = deque()
        self.active: list[EngineRequest] = []
        self.cond = threading.Condition()
        self.on_step = on_step  # metrics hook: batch size of each decode step
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="phi4rv-engine", daemon=True)

    # ---- public, any thread -------------------------------------------------------------------
    def start(self) -> Engine:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join(timeout=10)

    def submit(self, req: EngineRequest) -> None:
        if req.prompt_len + req.params.max_new_tokens + self.slack > self.slot_len:
            raise ValueError(
                f"prompt ({req.prompt_len} tokens) + max_tokens ({req.params.max_new_tokens}) exceeds the "
                f"context of {self.slot_len} tokens"
            )
        with self.cond:
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"queue full ({self.max_queue} waiting)")
            self.queue.append(req)
            self.cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def running(self) -> int:
        return len(self.active)

    # ---- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopped and not self.queue and not self.active:
                    self.cond.wait()
                if self.stopped:
                    break
                admitted = []
                while self.queue and self.free:
                    req = self.queue.popleft()
                    if req.cancelled:
                        continue
                    req.slot = self.free.pop()
                    admitted.append(req)
            try:
                with torch.inference_mode():
                    if admitted:
                        self._prefill(admitted)
                    self._expire()
                    if self.active:
                        self._decode()
            except Exception as e:  # a failed step fails its requests, never the server
                for req in {id(r): r for r in admitted + self.active}.values():
                    self._finish(req, e)

    def _finish(self, req: EngineRequest, error: BaseException | None = None) -> None:
        if req in self.active:
            self.active.remove(req)
        if req.slot >= 0:
            self.cache.lengths[req.slot] = 0
            with self.cond:
                self.free.append(req.slot)
            req.slot = -1
        if error is not None:
            req.emit(error)

    def _expire(self) -> None:
        now = time.monotonic()
        for req in list(self.active):
            if req.cancelled:
                self._finish(req)
            elif req.timeout is not None and now - req.submitted > req.timeout:
                self._finish(req, TimeoutError(f"request timed out after {req.timeout:g}s"))

    def _prefill(self, admitted: list[EngineRequest]) -> None:
        model = self.model
        images = [im for r in admitted for im in r.request.images]
        feats = None
        if images:
            pixels = torch.cat([im.pixels for im in images]).to(model.device)
            feats = model.encode_images(pixels, [im.grid for im in images])
        offset = 0
        for req in admitted:
            grids = [im.grid for im in req.request.images]
            n = sum(h * w for h, w in grids)
            ids = torch.tensor([expand_image_tokens(req.request.input_ids, grids)], device=model.device)
            x = model.embed(ids, feats[offset : offset + n] if n else None)
            offset += n
            mask = None
            if model.cfg.image_bidirectional_attention and grids:
                valid = torch.ones_like(ids, dtype=torch.bool)
                mask = attention_mask(valid, ids.shape[1], image_segment_ids(ids, [h * w for h, w in grids]))
            self.cache.bind([req.slot])
            positions = torch.arange(ids.shape[1], device=model.device)[None]
            h = model.decoder(x, positions, mask, self.cache)
            logits = model.decoder.lm_head(h[:, -1])
            req.state = SequenceState(self.tokenizer, req.params, req.request.thinking)
            if req.params.seed is not None:
                req.generator = torch.Generator(device=model.device).manual_seed(req.params.seed)
            self.active.append(req)
            self._emit([req], logits)

    def _decode(self) -> None:
        reqs = list(self.active)
        self.cache.bind([r.slot for r in reqs])
        tokens = torch.tensor([r.token for r in reqs], device=self.model.device)[:, None]
        positions = self.cache.starts[:, None]
        h = self.model.decoder(self.model.decoder.embed_tokens(tokens), positions, self.cache.decode_mask(), self.cache)
        if self.on_step:
            self.on_step(len(reqs))
        self._emit(reqs, self.model.decoder.lm_head(h[:, -1]))

    def _emit(self, reqs: list[EngineRequest], logits: torch.Tensor) -> None:
        """Pick each row's next token with its own sampling settings and hand it over."""
        if all(r.params.sampling.temperature == 0 for r in reqs):
            tokens = logits.argmax(-1)
        else:
            tokens = torch.stack([sample(logits[i : i + 1], r.params.sampling, r.generator)[0] for i, r in enumerate(reqs)])
        top = max(r.params.top_logprobs for r in reqs)
        chosen, top_v, top_i = token_logprobs(logits, tokens, top)
        for i, req in enumerate(reqs):
            token = req.state.forced.pop(0) if req.state.forced else int(tokens[i])
            logprob = float(chosen[i]) if token == int(tokens[i]) else float(logits[i].float().log_softmax(-1)[token])
            tops = None
            if req.params.top_logprobs:
                n = req.params.top_logprobs
                tops = list(zip(top_i[i, :n].tolist(), top_v[i, :n].tolist()))
            text, was_thinking, finish = req.state.push(token, self.tokenizer)
            req.token = token
            if finish is not None:
                self._finish(req)
            req.emit(TokenEvent(0, token, text, logprob, tops, was_thinking, finish))
