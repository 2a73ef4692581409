"""A stage's data: every dataset measured (skips counted), every micro-batch of every epoch planned
(packed or padded, a pure function of lengths and seed), and the micro-batches loaded in order.

A global micro-batch index is the whole data position, so resuming at step s replays nothing and
changes nothing. (`data.streaming` stages read their data as they go instead: train.stream.)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from phi4rv.data.dataset import Example, SampleEncoder, SkipSample, Source, mixture_order, sample_mode
from phi4rv.data.formats import Sample, read_samples
from phi4rv.data.packing import Batch, Plan, collate, pack_plan, pad_plan
from phi4rv.processing.image import ImageProcessorConfig
from phi4rv.processing.tokenizer import Tokenizer
from phi4rv.train.config import ConfigError, DatasetConfig, StageConfig, TrainConfig
from phi4rv.train.distributed import Dist, say

MicroBatch = list[list[tuple[int, int]]]  # rows -> (source, sample)


def measure(specs: list[DatasetConfig], encoder: SampleEncoder, d: Dist) -> list[Source]:
    """Read and measure every dataset; each process measures a share, then all exchange results."""
    sources = []
    for spec in specs:
        samples = list(read_samples(spec.path, spec.image_root))
        mine: dict[int, int | str] = {}
        for i in range(d.rank, len(samples), d.world):
            try:
                mine[i] = len(encoder.encode(samples[i]))
            except SkipSample as e:
                mine[i] = e.reason
        if d.enabled:
            parts = [None] * d.world
            torch.distributed.all_gather_object(parts, mine)
            for p in parts:
                mine.update(p)
        lengths = [mine[i] if isinstance(mine[i], int) else None for i in range(len(samples))]
        skipped = Counter(v for v in mine.values() if isinstance(v, str))
        sources.append(Source(spec.path, samples, lengths, [sample_mode(s) for s in samples], spec.weight, skipped))
    return sources


def describe(sources: list[Source], label: str) -> str:
    total = sum(len(s.samples) for s in sources)
    usable = sum(len(s.usable) for s in sources)
    skipped = sum((s.skipped for s in sources), Counter())
    think = sum(1 for s in sources for i in s.usable if s.modes[i] == "think")
    msg = f"{label}: {len(sources)} dataset(s), {total} samples, {usable} usable ({think} think / {usable - think} nothink)"
    if skipped:
        msg += ", skipped " + ", ".join(f"{k} {v}" for k, v in skipped.most_common())
    return msg


@dataclass
class StagePlan:
    micro: list[MicroBatch]  # by global micro-batch index
    steps: int
    per_step: int  # micro-batches per optimizer step, all processes
    epochs: int


def micro_per_step(stage: StageConfig, world: int) -> int:
    """Micro-batches per optimizer step, all processes."""
    d = stage.data
    per_step = (d.tokens_per_step or d.batch_tokens * world) // d.batch_tokens
    if per_step % world:
        raise ConfigError(
            f"tokens_per_step ({d.tokens_per_step}) must be a multiple of batch_tokens x processes ({d.batch_tokens} x {world})"
        )
    return per_step


def plan_stage(stage: StageConfig, sources: list[Source], seed: int, world: int) -> StagePlan:
    d = stage.data
    per_step = micro_per_step(stage, world)
    micro: list = []
    epoch = 0
    while True:
        order = mixture_order(sources, seed, epoch, d.think_ratio, d.shuffle)
        lengths = [sources[s].lengths[i] for s, i in order]
        plan: Plan = pack_plan(lengths, d.max_len, d.batch_tokens) if d.packing else pad_plan(lengths, d.batch_tokens)
        usable = len(plan) // per_step * per_step
        if usable == 0:
            raise ConfigError(
                f"the data fills {len(plan)} micro-batch(es) per epoch but one optimizer step needs {per_step}; "
                "add data or lower tokens_per_step / batch_tokens"
            )
        micro += [[[order[j] for j in row] for row in mb] for mb in plan[:usable]]
        epoch += 1
        steps = len(micro) // per_step
        if (stage.max_steps is None and epoch >= stage.epochs) or (stage.max_steps is not None and steps >= stage.max_steps):
            break
    steps = min(steps, stage.max_steps or steps)
    return StagePlan(micro[: steps * per_step], steps, per_step, epoch)


@dataclass
class EvalSet:
    sources: list[Source]
    micro: list[MicroBatch]
    samples: list[tuple[int, int]]  # (source, sample) pairs for answer scoring


def plan_eval(cfg: TrainConfig, stage: StageConfig, encoder: SampleEncoder, d: Dist) -> EvalSet | None:
    """The eval datasets (at most `eval.max_samples` usable samples), packed as the stage packs."""
    if not cfg.eval.datasets:
        return None
    sources = measure(cfg.eval.datasets, encoder, d)
    pairs = [(k, i) for k, s in enumerate(sources) for i in s.usable][: cfg.eval.max_samples]
    lengths = [sources[k].lengths[i] for k, i in pairs]
    plan = pack_plan(lengths, stage.data.max_len, stage.data.batch_tokens)
    micro = [[[pairs[j] for j in row] for row in mb] for mb in plan]
    return EvalSet(sources, micro, pairs)


def eval_data(cfg: TrainConfig, stage: StageConfig, encoder: SampleEncoder, d: Dist) -> EvalSet | None:
    """`plan_eval`, saying what it found."""
    ev = plan_eval(cfg, stage, encoder, d)
    if ev is not None:
        say(d, describe(ev.sources, "eval data"))
        if cfg.eval.generate and d.enabled:
            say(d, "note: eval.generate (answer accuracy) runs in single-process runs only; skipped")
    return ev


@dataclass
class StageData:
    encoder: SampleEncoder
    sources: list[Source]
    plan: StagePlan
    eval: EvalSet | None
    pad_id: int
    stream: object | None = None  # a streamed stage's `train.stream.DataStream` (`sources`, `plan.micro` then empty)

    def per_rank(self, d: Dist) -> int:
        """Micro-batches each process runs per optimizer step."""
        return self.plan.per_step // d.world


def plan_data(cfg: TrainConfig, name: str, stage: StageConfig, image_cfg: ImageProcessorConfig, tokenizer: Tokenizer,
              d: Dist) -> StageData:
    """Measure and plan a stage's training data and the eval data, saying what was found."""
    encoder = SampleEncoder(tokenizer, image_cfg, stage.data.max_len)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    sources = measure(stage.data.datasets, encoder, d)
    say(d, describe(sources, "data"))
    if not any(s.usable for s in sources):
        raise ConfigError(f"stages.{name}: no usable sample in the data")
    plan = plan_stage(stage, sources, cfg.seed, d.world)
    ev = eval_data(cfg, stage, encoder, d)
    data = StageData(encoder, sources, plan, ev, pad_id)
    say(d, f"plan: {plan.steps} steps x {plan.per_step} micro-batches of <= {stage.data.batch_tokens} tokens "
           f"({'packed' if stage.data.packing else 'padded'}), {plan.epochs} epoch(s), {d.world} process(es), "
           f"{data.per_rank(d)} micro-batch(es) per process per step")
    return data


class MicroBatches(Dataset):
    """The planned micro-batches at `indices` (global indices; -1 is an empty filler), loaded and collated."""

    def __init__(self, micro: list[MicroBatch], sources: list[Source], encoder: SampleEncoder, indices: list[int],
                 pad_id: int):
        self.micro, self.sources, self.encoder, self.indices, self.pad_id = micro, sources, encoder, indices, pad_id

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Batch:
        i = self.indices[k]
        if i < 0:  # filler so every process runs the same number of forward passes
            return collate([], self.pad_id)
        rows = [[self.sources[s].samples[j] for s, j in row] for row in self.micro[i]]
        return load_micro_batch(self.encoder, rows, self.pad_id)


def load_micro_batch(encoder: SampleEncoder, rows: list[list[Sample]], pad_id: int, skipped: dict | None = None) -> Batch:
    """Planned rows of samples, encoded with their pixels and collated; samples that fail to load
    are dropped and counted (on top of `skipped`)."""
    counts, out = Counter(skipped or {}), []
    for row in rows:
        examples: list[Example] = []
        for sample in row:
            try:
                examples.append(encoder.load_pixels(encoder.encode(sample)))
            except SkipSample as e:
                counts[e.reason] += 1
        out.append(examples)
    return collate(out, pad_id, dict(counts))


def loader(ds: Dataset, workers: int) -> DataLoader:
    # Its own generator: creating an iterator draws a seed, which must not move the global RNG
    # (LoRA dropout draws from it, and a resumed run creates its iterator at a different time).
    return DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
                      generator=torch.Generator())


def _identity(batch: Batch) -> Batch:
    return batch
