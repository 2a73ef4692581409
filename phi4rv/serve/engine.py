"""Continuous batching: requests join and leave the running batch at every decode step.

One background thread owns the model and a generation `Core` (its slots are the KV memory). At
each iteration it admits queued requests into free slots (prefilled together), runs one decode
step for every running request, and hands each token to its request's callback. Finished,
cancelled and timed-out requests free their slot at the next step; a request that fails fails
alone; on shutdown every queued and running request gets a final error.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from phi4rv.config import Phi4RVConfig
from phi4rv.generation.core import Core, GenerationParams, Request, Sequence, TokenEvent
from phi4rv.model.vlm import Phi4RV
from phi4rv.processing.tokenizer import Tokenizer


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class EngineRequest:
    request: Request
    params: GenerationParams
    emit: Callable[[TokenEvent | BaseException], None]  # called from the engine thread
    timeout: float | None = None  # seconds from submission, queued time included
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    seq: Sequence | None = None

    def __post_init__(self):
        self.seq = Sequence(self.request, self.params)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def prompt_len(self) -> int:
        return self.request.prompt_len

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now - self.submitted > self.timeout


def context_length(cfg: Phi4RVConfig, asked: int | None) -> int:
    """Positions per sequence (a KV cache slot): `asked`, checked, or the model's max_length."""
    positions = cfg.decoder.max_position_embeddings
    if asked is not None and not 1 <= asked <= positions:
        raise ValueError(f"context of {asked} positions: the model has 1 to {positions}")
    return asked or min(cfg.max_length, positions)


class Engine:
    def __init__(
        self,
        model: Phi4RV,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        slot_len: int | None = None,
        on_step: Callable[[int], None] | None = None,
        prefix_cache_bytes: int = 0,
        reserve_bytes: int = 0,
    ):
        self.max_queue = max_queue
        self.core = Core(model, tokenizer, max_batch, context_length(model.cfg, slot_len), prefix_cache_bytes, reserve_bytes)
        self.queue: deque[EngineRequest] = deque()
        self.active: list[EngineRequest] = []
        self.cond = threading.Condition()
        self.on_step = on_step  # metrics hook: batch size of each decode step
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="phi4rv-engine", daemon=True)

    @property
    def slot_len(self) -> int:
        return self.core.slot_len

    @property
    def slack(self) -> int:
        return self.core.slack

    # ---- public, any thread -------------------------------------------------------------------
    def start(self) -> Engine:
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop after the current step; every request still queued or running gets `ShuttingDown`."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join(timeout=30)
        with self.cond:
            left, self.queue = list(self.queue), deque()
        for req in left + self.active:
            self._finish(req, ShuttingDown("server shutting down"))

    def submit(self, req: EngineRequest) -> None:
        self.core.check_fits(req.request, req.params)
        with self.cond:
            if self.stopped:
                raise ShuttingDown("server shutting down")
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
                    self.cond.wait(timeout=1.0)
                    self._expire_queued()
                if self.stopped:
                    return
                self._expire_queued()
                admitted, longest = [], 0
                while self.queue and len(admitted) < len(self.core.free):
                    req = self.queue[0]
                    if req.cancelled:
                        self.queue.popleft()
                        continue
                    # One right-padded prefill holds (prompts x the longest) positions of activations:
                    # at most a whole slot's worth, or the first prompt alone.
                    longest = max(longest, req.request.prompt_len)
                    if admitted and (len(admitted) + 1) * longest > self.core.slot_len:
                        break
                    admitted.append(self.queue.popleft())
            try:
                if admitted:
                    self._admit(admitted)
                self._expire()
                if self.active:
                    self._step()
            except Exception as e:  # never lose the engine thread: fail what was running
                for req in list(self.active):
                    self._finish(req, e)

    def _admit(self, reqs: list[EngineRequest]) -> None:
        try:
            events = self.core.admit([r.seq for r in reqs])
        except Exception:
            # Find the request that failed: each one again, alone; only the failing ones fail.
            for r in reqs:
                self.core.release(r.seq)
            if len(reqs) == 1:
                try:
                    events = self.core.admit([reqs[0].seq])
                except Exception as e:
                    self.core.release(reqs[0].seq)
                    reqs[0].emit(e)
                    return
            else:
                for r in reqs:
                    self._admit([r])
                return
        self.active.extend(reqs)
        self._deliver(reqs, events)

    def _step(self) -> None:
        reqs = list(self.active)
        try:
            events = self.core.step([r.seq for r in reqs])
        except Exception:
            if len(reqs) == 1:
                try:  # once more alone: a failure that persists is this request's
                    events = self.core.step([reqs[0].seq])
                except Exception as e:
                    self._finish(reqs[0], e)
                    return
            else:
                for r in reqs:
                    self.active = [r]
                    self._step()
                self.active = [r for r in reqs if r.seq.slot >= 0]
                return
        if self.on_step:
            self.on_step(len(reqs))
        self._deliver(reqs, events)

    def _deliver(self, reqs: list[EngineRequest], events: list[TokenEvent]) -> None:
        for req, ev in zip(reqs, events):
            if ev.finish_reason is not None:
                self._finish(req)
            req.emit(ev)

    def _finish(self, req: EngineRequest, error: BaseException | None = None) -> None:
        if req in self.active:
            self.active.remove(req)
        self.core.release(req.seq)
        if error is not None:
            req.emit(error)

    def _expire(self) -> None:
        now = time.monotonic()
        for req in list(self.active):
            if req.cancelled:
                self._finish(req)
            elif req.expired(now):
                self._finish(req, TimeoutError(f"request timed out after {req.timeout:g}s"))

    def _expire_queued(self) -> None:
        """Drop cancelled queued requests and fail expired ones (caller holds the lock)."""
        if not self.queue:
            return
        now = time.monotonic()
        keep: deque[EngineRequest] = deque()
        for req in self.queue:
            if req.cancelled:
                continue
            if req.expired(now):
                req.emit(TimeoutError(f"request timed out after {req.timeout:g}s waiting for a slot"))
            else:
                keep.append(req)
        self.queue = keep
