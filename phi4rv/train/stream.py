"""Streamed training data (`data.streaming: true`): datasets read as training goes, so memory does
not grow with their size, and an exact resume from the stream's state saved in each checkpoint.

The stream: a seeded RNG picks each next sample's dataset by weight (weights are relative rates
here, a dataset's size being unknown ahead), its reader (`data.formats.StreamReader`: a .jsonl
line or a Parquet row group at a time) gives the next sample, repeating passes over the files as
needed; the sample is tokenized and its images measured from their headers (skips counted, on
every pass), then goes into a shuffle buffer of `shuffle_buffer` samples from which the RNG draws
the next one; drawn samples are packed by `RowPacker` / `RowPadder`, the rules of `pack_plan` /
`pad_plan`, so micro-batches are of the same kind as in the whole-dataset path. A stage runs
`max_steps` steps of `per_step` consecutive micro-batches.

Every process runs the same stream (reading and tokenizing every sample: cheap next to a training
step) and loads pixels only for its own micro-batches, by the global index rule of the
whole-dataset path (step s, process r: micro-batches s*per_step + r*per_rank + a). So processes
agree on every step without a collective, and the stream does not depend on the process count.

The stream's state at an optimizer-step boundary (`DataStream.state`, JSON, saved as
trainer/data_stream.json in each checkpoint): the RNG state, per dataset its pass and the
position of the last sample read, and the shuffle buffer and the open micro-batch as (dataset,
position, length) entries whose samples a resume re-reads (`StreamReader.read_at`).

With `num_workers`, the stream stays in the main process and a pool of worker processes loads
pixels and collates the planned micro-batches, at most 2 x num_workers ahead, in order; a worker
exits when the trainer is gone (a SIGKILL leaves no orphans).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from phi4rv.data.dataset import SampleEncoder, SkipSample
from phi4rv.data.formats import Position, Sample, StreamReader
from phi4rv.data.packing import Batch, RowPacker, RowPadder
from phi4rv.processing.image import ImageProcessorConfig
from phi4rv.processing.tokenizer import Tokenizer
from phi4rv.train.batches import StageData, StagePlan, eval_data, load_micro_batch, micro_per_step
from phi4rv.train.config import ConfigError, DataConfig, DatasetConfig, StageConfig, TrainConfig
from phi4rv.train.distributed import Dist, say


@dataclass
class Item:
    source: int
    pos: Position
    length: int
    sample: Sample


class DataStream:
    """The stage's micro-batches, one at a time (`next_micro_batch`), and the state to resume them."""

    def __init__(self, specs: list[DatasetConfig], encoder: SampleEncoder, data: DataConfig, seed: int):
        self.readers = [StreamReader(s.path, s.image_root) for s in specs]
        self.weights = [s.weight for s in specs]
        self.encoder = encoder
        self.buffer_size = data.shuffle_buffer if data.shuffle else 1
        self.packer = RowPacker(data.max_len, data.batch_tokens) if data.packing else RowPadder(data.batch_tokens)
        self.rng = random.Random(f"{seed}:stream")
        k = len(specs)
        self.passes = [0] * k  # completed passes over each dataset
        self.last: list[Position | None] = [None] * k  # the last sample read in the current pass
        self.usable_in_pass = [0] * k
        self.skipped: Counter = Counter()
        self.buffer: list[Item] = []
        self._open: list[Iterator | None] = [None] * k

    def _next(self, k: int) -> Item:
        """Dataset k's next usable sample, starting another pass at the end of one."""
        while True:
            if self._open[k] is None:
                self._open[k] = self.readers[k].read(self.last[k])
            try:
                pos, sample = next(self._open[k])
            except StopIteration:
                if not self.usable_in_pass[k]:
                    raise ConfigError(f"{self.readers[k].path}: no usable sample in the whole dataset "
                                      f"(skipped: {dict(self.skipped) or 'none'})") from None
                self._open[k], self.last[k] = None, None
                self.passes[k] += 1
                self.usable_in_pass[k] = 0
                continue
            self.last[k] = pos
            try:
                n = len(self.encoder.encode(sample))
            except SkipSample as e:
                self.skipped[e.reason] += 1
                continue
            self.usable_in_pass[k] += 1
            return Item(k, pos, n, sample)

    def next_micro_batch(self) -> list[list[Item]]:
        while True:
            while len(self.buffer) < self.buffer_size:
                k = self.rng.choices(range(len(self.readers)), self.weights)[0]
                self.buffer.append(self._next(k))
            j = self.rng.randrange(len(self.buffer))
            item = self.buffer[j]
            self.buffer[j] = self.buffer[-1]
            self.buffer.pop()
            done = self.packer.add(item, item.length)
            if done is not None:
                return done

    def state(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        entry = lambda it: [it.source, *it.pos, it.length]  # noqa: E731
        return {
            "datasets": [str(r.path) for r in self.readers],
            "rng": [version, list(internal), gauss],
            "passes": list(self.passes),
            "last": [None if p is None else list(p) for p in self.last],
            "usable_in_pass": list(self.usable_in_pass),
            "skipped": dict(self.skipped),
            "buffer": [entry(it) for it in self.buffer],
            "open_micro_batch": [[entry(it) for it in row] for row in self.packer.rows],
        }

    def restore(self, state: dict) -> None:
        """Continue exactly where `state` was taken, re-reading the buffered samples by position."""
        if state["datasets"] != [str(r.path) for r in self.readers]:
            raise ConfigError(f"the checkpoint streamed other datasets ({', '.join(state['datasets'])}); "
                              "resume with the same data.datasets")
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.passes, self.usable_in_pass = list(state["passes"]), list(state["usable_in_pass"])
        self.last = [None if p is None else tuple(p) for p in state["last"]]
        self.skipped = Counter(state["skipped"])
        self._open = [None] * len(self.readers)
        rows = state["open_micro_batch"]
        items = self._reread(state["buffer"] + [e for row in rows for e in row])
        self.buffer = items[: len(state["buffer"])]
        rest = iter(items[len(state["buffer"]):])
        self.packer.rows = [[next(rest) for _ in row] for row in rows]
        if isinstance(self.packer, RowPacker):
            self.packer.room = [self.packer.row_len - sum(it.length for it in row) for row in self.packer.rows]
        else:
            self.packer.longest = max((it.length for row in self.packer.rows for it in row), default=0)

    def _reread(self, entries: list[list]) -> list[Item]:
        out: list[Item | None] = [None] * len(entries)
        for k, reader in enumerate(self.readers):
            mine = [i for i, e in enumerate(entries) if e[0] == k]
            samples = reader.read_at([tuple(entries[i][1:4]) for i in mine])
            for i, sample in zip(mine, samples):
                out[i] = Item(k, tuple(entries[i][1:4]), entries[i][4], sample)
        return out

    def describe(self) -> str:
        passes = ", ".join(f"{r.path.name} {p + (1 if u else 0)}" for r, p, u in zip(self.readers, self.passes, self.usable_in_pass))
        msg = f"streamed data: passes begun per dataset: {passes}"
        if self.skipped:
            msg += ", skipped " + ", ".join(f"{k} {v}" for k, v in self.skipped.most_common())
        return msg


class StreamedBatches:
    """This process's micro-batches of steps `start` .. `steps - 1`, loaded (pixels) and collated, in
    order; `state_at(step)` is the stream's state at that step boundary, for a checkpoint. Samples
    skipped while streaming go with process 0's first micro-batch of the step they were read in,
    so they are counted once, as skips found while loading are."""

    def __init__(self, stream: DataStream, pad_id: int, per_step: int, d: Dist, start: int, steps: int, workers: int):
        self.stream, self.pad_id, self.per_step, self.d = stream, pad_id, per_step, d
        self.start, self.steps, self.workers = start, steps, workers
        self.per_rank = per_step // d.world
        self.states = {start: stream.state()}
        self.keep = 2 * workers + 2  # steps of states kept: the loader runs at most 2 x workers micro-batches ahead

    def _plans(self) -> Iterator[tuple[list[list[Sample]], dict]]:
        for step in range(self.start, self.steps):
            before = Counter(self.stream.skipped)
            mbs = [self.stream.next_micro_batch() for _ in range(self.per_step)]
            self.states[step + 1] = self.stream.state()
            for old in [s for s in self.states if s < step + 1 - self.keep]:
                del self.states[old]  # the trainer is at most `keep` steps behind this producer
            skipped = dict(self.stream.skipped - before)
            for a in range(self.per_rank):
                rows = [[it.sample for it in row] for row in mbs[self.d.rank * self.per_rank + a]]
                yield rows, (skipped if self.d.rank == 0 and a == 0 else {})

    def __iter__(self) -> Iterator[Batch]:
        encoder = self.stream.encoder
        if not self.workers:
            for rows, skipped in self._plans():
                yield load_micro_batch(encoder, rows, self.pad_id, skipped)
            return
        with ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"), initializer=_init_worker,
                                 initargs=(encoder, self.pad_id)) as pool:
            pending: deque = deque()
            for rows, skipped in self._plans():
                pending.append(pool.submit(_load_in_worker, rows, skipped))
                if len(pending) > 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def state_at(self, step: int) -> dict:
        for s in [s for s in self.states if s < step]:
            del self.states[s]
        return self.states[step]


_worker: tuple[SampleEncoder, int] | None = None


def _init_worker(encoder: SampleEncoder, pad_id: int) -> None:
    global _worker
    _worker = (encoder, pad_id)
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()


def _exit_with(parent: int) -> None:
    """A killed trainer (SIGKILL) cannot stop its pool: its workers stop themselves."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def _load_in_worker(rows: list[list[Sample]], skipped: dict) -> Batch:
    encoder, pad_id = _worker
    return load_micro_batch(encoder, rows, pad_id, skipped)


def plan_streamed_data(cfg: TrainConfig, name: str, stage: StageConfig, image_cfg: ImageProcessorConfig,
                       tokenizer: Tokenizer, d: Dist) -> StageData:
    """A streamed stage's data: the stream (nothing read yet but the first samples) and the eval data."""
    encoder = SampleEncoder(tokenizer, image_cfg, stage.data.max_len)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    per_step = micro_per_step(stage, d.world)
    stream = DataStream(stage.data.datasets, encoder, stage.data, cfg.seed)
    say(d, f"data: {len(stream.readers)} dataset(s), streamed (shuffle buffer of {stream.buffer_size} samples)")
    ev = eval_data(cfg, stage, encoder, d)
    data = StageData(encoder, [], StagePlan([], stage.max_steps, per_step, 0), ev, pad_id, stream)
    say(d, f"plan: {stage.max_steps} steps x {per_step} micro-batches of <= {stage.data.batch_tokens} tokens "
           f"({'packed' if stage.data.packing else 'padded'}, streamed), {d.world} process(es), "
           f"{data.per_rank(d)} micro-batch(es) per process per step")
    return data
