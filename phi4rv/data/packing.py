"""Token-budget batching: packed rows (several samples per row, block-causal) or one padded sample per row.

A micro-batch is a list of rows; a row is a list of samples. Planning works on lengths only, so the
whole epoch's plan is known before training (step counts, exact resume by micro-batch index);
`RowPacker` / `RowPadder` apply the same rules one sample at a time (streamed data, `train.stream`).

Packed: rows of at most `row_len` tokens, `batch_tokens // row_len` rows per micro-batch, samples
placed in order, each into the first open row with room (first fit). In a row every sample keeps
its own positions (restarting at 0) and attends only to itself (`segment_ids`). Images are packed
for the vision encoder in the order their placeholders appear, row by row.

Padded: one sample per row, as many rows as fit `rows * longest <= batch_tokens`; the baseline that
packing is measured against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from phi4rv.data.dataset import Example
from phi4rv.processing.tokens import IGNORE_INDEX

Plan = list[list[list[int]]]  # micro-batch -> row -> positions in the caller's sequence


def pack_plan(lengths: Sequence[int], row_len: int, batch_tokens: int) -> Plan:
    packer = RowPacker(row_len, batch_tokens)
    plan: Plan = [mb for i, n in enumerate(lengths) if (mb := packer.add(i, n)) is not None]
    return plan + ([packer.rows] if packer.rows else [])


def pad_plan(lengths: Sequence[int], batch_tokens: int) -> Plan:
    padder = RowPadder(batch_tokens)
    plan: Plan = [mb for i, n in enumerate(lengths) if (mb := padder.add(i, n)) is not None]
    return plan + ([padder.rows] if padder.rows else [])


class RowPacker:
    """`pack_plan` one sample at a time: `add` returns the micro-batch it completes, if any, so a
    stream of samples packs exactly as the whole list would. `rows` / `room` are the open micro-batch."""

    def __init__(self, row_len: int, batch_tokens: int):
        self.row_len, self.max_rows = row_len, batch_tokens // row_len
        if self.max_rows < 1:
            raise ValueError(f"batch_tokens ({batch_tokens}) must be at least the row length ({row_len})")
        self.rows: list[list] = []
        self.room: list[int] = []

    def add(self, item, n: int) -> list[list] | None:
        if n > self.row_len:
            raise ValueError(f"sample {item} has {n} tokens, more than the row length {self.row_len}")
        done = None
        r = next((r for r, free in enumerate(self.room) if free >= n), None)
        if r is None:
            if len(self.rows) == self.max_rows:
                done, self.rows, self.room = self.rows, [], []
            self.rows.append([])
            self.room.append(self.row_len)
            r = len(self.rows) - 1
        self.rows[r].append(item)
        self.room[r] -= n
        return done


class RowPadder:
    """`pad_plan` one sample at a time (see `RowPacker`); `longest` is the open micro-batch's longest sample."""

    def __init__(self, batch_tokens: int):
        self.batch_tokens = batch_tokens
        self.rows: list[list] = []
        self.longest = 0

    def add(self, item, n: int) -> list[list] | None:
        if n > self.batch_tokens:
            raise ValueError(f"sample {item} has {n} tokens, more than batch_tokens {self.batch_tokens}")
        done = None
        if self.rows and (len(self.rows) + 1) * max(self.longest, n) > self.batch_tokens:
            done, self.rows, self.longest = self.rows, [], 0
        self.rows.append([item])
        self.longest = max(self.longest, n)
        return done


@dataclass
class Batch:
    input_ids: torch.Tensor  # [R, T] long, images expanded (IMAGE_TOKEN_ID), padding = pad_id
    targets: torch.Tensor  # [R, T] long, IGNORE_INDEX where no loss
    positions: torch.Tensor  # [R, T] long, restarting per sample
    segment_ids: torch.Tensor  # [R, T] long, 1, 2, ... per sample in a row, 0 = padding
    pixels: torch.Tensor | None  # [N, C*p*p] every image's patches, in placeholder order
    grids: list[tuple[int, int]]
    num_samples: int
    skipped: dict[str, int]  # samples dropped while loading this batch (e.g. an undecodable image)

    @property
    def num_tokens(self) -> int:
        return int((self.segment_ids > 0).sum())

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def num_images(self) -> int:
        return len(self.grids)

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.input_ids), move(self.targets), move(self.positions), move(self.segment_ids),
            move(self.pixels), self.grids, self.num_samples, self.skipped,
        )

    def model_inputs(self) -> dict:
        return dict(
            input_ids=self.input_ids, pixels=self.pixels, grids=self.grids,
            positions=self.positions, segment_ids=self.segment_ids,
        )


def collate(rows: list[list[Example]], pad_id: int = 0, skipped: dict[str, int] | None = None) -> Batch:
    """Rows of examples (with pixels loaded) -> one right-padded Batch. An empty input gives a
    one-token batch with no targets, so every process still runs its forward and backward."""
    rows = [r for r in rows if r]
    if not rows:
        z = torch.zeros(1, 1, dtype=torch.long)
        return Batch(z + pad_id, z + IGNORE_INDEX, z, z + 1, None, [], 0, dict(skipped or {}))
    t = max(sum(len(ex) for ex in row) for row in rows)
    shape = (len(rows), t)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.zeros(shape, dtype=torch.long)
    pixels, grids, n = [], [], 0
    for r, row in enumerate(rows):
        start = 0
        for k, ex in enumerate(row, 1):
            end = start + len(ex)
            ids[r, start:end] = torch.tensor(ex.input_ids)
            targets[r, start:end] = torch.tensor(ex.targets)
            positions[r, start:end] = torch.arange(len(ex))
            segments[r, start:end] = k
            pixels += ex.pixels or []
            grids += ex.grids
            start = end
            n += 1
    return Batch(ids, targets, positions, segments, torch.cat(pixels) if pixels else None, grids, n, dict(skipped or {}))
