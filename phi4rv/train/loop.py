"""The training loop: stages in order, each from the previous one's final weights.

One stage = measure its data (skips counted and reported), plan every micro-batch of every epoch
(packed or padded, a pure function of lengths and seed), build the model (freeze, LoRA, FSDP2),
then for each optimizer step: gather `tokens_per_step` worth of micro-batches (this process's
share), normalise the loss by the step's supervised-token count over all processes, accumulate,
clip, step; log, evaluate and checkpoint on schedule. A global micro-batch index is the whole
data position, so resuming at step s replays nothing and changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from phi4rv.checkpoint import DTYPES, load_model, save_checkpoint
from phi4rv.config import Phi4RVConfig, preset
from phi4rv.data.dataset import SKIP_REASONS, Example, SampleEncoder, SkipSample, Source, mixture_order, sample_mode
from phi4rv.data.formats import read_samples
from phi4rv.data.packing import Batch, Plan, collate, pack_plan, pad_plan
from phi4rv.lora import StateView, apply_lora, is_lora_param, lora_scales, merge_state_dict
from phi4rv.model.vlm import IGNORE_INDEX, Phi4RV
from phi4rv.processing.chat import DEFAULT_CHAT_TEMPLATE, parse_completion
from phi4rv.processing.image import ImageProcessorConfig
from phi4rv.processing.tokenizer import Tokenizer
from phi4rv.train import checkpointing as ckpt_io
from phi4rv.train.config import ConfigError, DatasetConfig, StageConfig, TrainConfig, parse_size
from phi4rv.train.distributed import (
    Dist,
    clip_grad_norm,
    full_model_state,
    init_distributed,
    load_optimizer_state,
    set_gradient_sync,
    shard_model,
    shutdown,
)
from phi4rv.train.loss import chunked_cross_entropy
from phi4rv.train.metrics import MetricsLog, plot_metrics
from phi4rv.train.plan import gib, options_that_fit, plan_memory
from phi4rv.train.stages import build_optimizer, format_table, freeze_for_stage, lr_factor, parameter_table, set_lr


def say(d: Dist, msg: str) -> None:
    if d.main:
        tqdm.write(msg, file=sys.stderr)


# ---- model and tokenizer -------------------------------------------------------------------


def load_tokenizer(cfg: TrainConfig) -> Tokenizer:
    m = cfg.model
    if m.tokenizer == "phi4":
        from phi4rv.processing.tokenizer import build_phi4_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            build_phi4_tokenizer(tmp)
            tok = Tokenizer.from_dir(tmp)
    else:
        tok = Tokenizer.from_dir(m.tokenizer or m.checkpoint)
    if m.chat_template:
        tok.chat_template = Path(m.chat_template).read_text()
    if tok.chat_template is None:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def _override(cfg: Phi4RVConfig, overrides: dict) -> Phi4RVConfig:
    for dotted, value in overrides.items():
        *path, leaf = dotted.split(".")
        node = cfg
        for key in path:
            node = getattr(node, key, None)
        if node is None or not hasattr(node, leaf) or leaf == "raw":
            raise ConfigError(f"model.overrides: no model config field {dotted!r}")
        setattr(node, leaf, type(getattr(node, leaf))(value) if getattr(node, leaf) is not None else value)
    cfg.projector.input_size = cfg.vision.hidden_size
    cfg.projector.output_size = cfg.decoder.hidden_size
    return cfg


def model_config(cfg: TrainConfig, source: Path | None, tokenizer: Tokenizer) -> Phi4RVConfig:
    """The starting model's config, without touching weights."""
    if source is not None:
        return Phi4RVConfig.load(source)
    if cfg.model.checkpoint:
        return _override(Phi4RVConfig.load(cfg.model.checkpoint), cfg.model.overrides)
    mc = preset(cfg.model.preset)
    mc.decoder.vocab_size = tokenizer.vocab_size
    mc.bos_token_id, mc.eos_token_id, mc.pad_token_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    return _override(mc, cfg.model.overrides)


def image_config(mc: Phi4RVConfig) -> ImageProcessorConfig:
    return ImageProcessorConfig(patch_size=mc.vision.patch_size, min_num_patches=mc.min_num_patches, max_num_patches=mc.max_num_patches)


def build_model(cfg: TrainConfig, stage: StageConfig, mc: Phi4RVConfig, source: Path | None, resume_from: Path | None) -> Phi4RV:
    dtype = DTYPES[cfg.model.dtype]
    lora = "lora" in stage.train
    if resume_from is not None and not lora:
        model = load_model(resume_from)  # trained parts were saved in float32: exact
    elif source is not None or cfg.model.checkpoint:
        model = load_model(source or cfg.model.checkpoint, dtype=dtype, config=mc)
    else:
        torch.manual_seed(cfg.seed)
        model = Phi4RV(mc) if dtype == torch.float32 else init_in_dtype(mc, dtype)
        if dtype == torch.float32:
            model.init_weights()
    if lora:
        torch.manual_seed(cfg.seed)
        lc = cfg.lora
        apply_lora(model, lc.rank, lc.alpha, lc.dropout, lc.targets, lc.vision_targets if lc.vision else None)
        if resume_from is not None:
            saved = ckpt_io.load_trainable(resume_from)
            missing, unexpected = model.load_state_dict(saved, strict=False)
            if unexpected or any(is_lora_param(k) for k in missing):
                raise ValueError(f"{resume_from}: adapters do not match the LoRA config ({(unexpected or missing)[:3]})")
    freeze_for_stage(model, stage)
    model.decoder.checkpointing = cfg.activation_checkpointing
    return model.train()


def init_in_dtype(mc: Phi4RVConfig, dtype: torch.dtype) -> Phi4RV:
    """A randomly initialised model (Phi4RV.init_weights' rules, drawn in `dtype`), built on the
    meta device and filled module by module, so that no float32 copy ever exists (at the 15B's
    widths the embeddings and LM head alone are 4 GB in float32)."""
    from phi4rv.model.decoder import RMSNorm

    with torch.device("meta"):
        model = Phi4RV(mc)
    for m in model.modules():
        if not list(m.parameters(recurse=False)):
            continue
        for name, p in list(m.named_parameters(recurse=False)):
            m.register_parameter(name, torch.nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=p.requires_grad))
        with torch.no_grad():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.weight.normal_(0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            else:
                raise TypeError(f"no init rule for {type(m).__name__}")
    return model


# ---- data ----------------------------------------------------------------------------------


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
    micro: list[list[list[tuple[int, int]]]]  # global micro-batch -> rows -> (source, sample)
    steps: int
    per_step: int  # micro-batches per optimizer step, all processes
    epochs: int


def plan_stage(stage: StageConfig, sources: list[Source], seed: int, world: int) -> StagePlan:
    d = stage.data
    per_step = (d.tokens_per_step or d.batch_tokens * world) // d.batch_tokens
    if per_step % world:
        raise ConfigError(
            f"tokens_per_step ({d.tokens_per_step}) must be a multiple of batch_tokens x processes ({d.batch_tokens} x {world})"
        )
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


class MicroBatches(Dataset):
    def __init__(self, micro, sources: list[Source], encoder: SampleEncoder, indices: list[int], pad_id: int):
        self.micro, self.sources, self.encoder, self.indices, self.pad_id = micro, sources, encoder, indices, pad_id

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Batch:
        i = self.indices[k]
        if i < 0:  # filler so every process runs the same number of forward passes
            return collate([], self.pad_id)
        rows, skipped = [], Counter()
        for row in self.micro[i]:
            out: list[Example] = []
            for s, j in row:
                try:
                    out.append(self.encoder.load_pixels(self.encoder.encode(self.sources[s].samples[j])))
                except SkipSample as e:
                    skipped[e.reason] += 1
            rows.append(out)
        return collate(rows, self.pad_id, dict(skipped))


def loader(ds: Dataset, workers: int) -> DataLoader:
    # Its own generator: creating an iterator draws a seed, which must not move the global RNG
    # (LoRA dropout draws from it, and a resumed run creates its iterator at a different time).
    return DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
                      generator=torch.Generator())


def _identity(batch):
    return batch


# ---- forward / loss ------------------------------------------------------------------------


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_terms(model, batch: Batch, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of correct argmax predictions) over the batch's targets.

    With `chunk` > 0 the LM head and the loss run `chunk` scored tokens at a time (train.loss), never
    holding the whole [tokens, vocab] logits; 0 computes them at once."""
    scored = batch.targets != IGNORE_INDEX
    targets = batch.targets[scored]
    # Under FSDP every process must run every sharded unit, in the same order, the same number of
    # times (each forward all-gathers a unit's parameters, each backward reduce-scatters its
    # gradients): a micro-batch without images (text only, a filler, samples dropped while
    # loading) still runs the vision tower, on a blank patch that adds exactly zero. One process
    # does the same, so that a step without images gives the vision tower zero gradients (AdamW
    # still moves it by its momentum) with any number of processes, not none.
    head = model.decoder.lm_head
    if chunk and type(head) is torch.nn.Linear and head.bias is None:
        hidden = model(**batch.model_inputs(), logits_at=scored, always_run_vision=True, hidden_only=True)
        # after the forward, FSDP2 leaves the root's parameters (the LM head among them) unsharded
        return chunked_cross_entropy(hidden, head.weight, targets, chunk)
    logits = model(**batch.model_inputs(), logits_at=scored, always_run_vision=True).float()  # [N, V]
    loss = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum()
    return loss, correct


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---- evaluation ----------------------------------------------------------------------------


@dataclass
class EvalSet:
    sources: list[Source]
    micro: list
    samples: list  # (source, sample) pairs for answer scoring


def build_eval(cfg: TrainConfig, stage: StageConfig, encoder: SampleEncoder, d: Dist) -> EvalSet | None:
    if not cfg.eval.datasets:
        return None
    sources = measure(cfg.eval.datasets, encoder, d)
    pairs = [(k, i) for k, s in enumerate(sources) for i in s.usable][: cfg.eval.max_samples]
    lengths = [sources[k].lengths[i] for k, i in pairs]
    plan = pack_plan(lengths, stage.data.max_len, stage.data.batch_tokens)
    micro = [[[pairs[j] for j in row] for row in mb] for mb in plan]
    return EvalSet(sources, micro, pairs)


def norm_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


@torch.no_grad()
def evaluate(model, ev: EvalSet, encoder: SampleEncoder, cfg: TrainConfig, tokenizer: Tokenizer, d: Dist, pad_id: int) -> dict:
    model.eval()
    n = len(ev.micro)
    per_rank = -(-n // d.world)
    mine = [i if i < n else -1 for i in range(d.rank * per_rank, (d.rank + 1) * per_rank)]
    loss = correct = count = 0.0
    for batch in loader(MicroBatches(ev.micro, ev.sources, encoder, mine, pad_id), 0):
        batch = batch.to(d.device)
        with autocast(cfg, d.device):
            l, c = loss_terms(model, batch, cfg.loss_chunk_tokens)
        loss, correct, count = loss + float(l), correct + float(c), count + batch.num_targets
    loss, correct, count = d.sum([loss, correct, count])
    out = {"eval/loss": loss / max(count, 1), "eval/token_acc": correct / max(count, 1)}
    if cfg.eval.generate and not d.enabled:
        out.update(answer_accuracy(model, ev, encoder, cfg, tokenizer))
    model.train()
    return out


def answer_accuracy(model, ev: EvalSet, encoder: SampleEncoder, cfg: TrainConfig, tokenizer: Tokenizer) -> dict:
    """Greedy answers to the first `eval.generate` samples' last question, scored by exact match
    (case, spacing and a final period ignored) against the reference answer."""
    from phi4rv.chat_model import ChatModel, Conversation
    from phi4rv.generation.sampling import SamplingParams

    cm = ChatModel(model, tokenizer, encoder.image_cfg, {})
    params = cm.params(max_new_tokens=cfg.eval.max_new_tokens, sampling=SamplingParams(temperature=0))
    hits: Counter = Counter()
    totals: Counter = Counter()
    pairs = ev.samples[: cfg.eval.generate]
    for start in range(0, len(pairs), 16):
        convs, refs, tasks = [], [], []
        for k, i in pairs[start : start + 16]:
            s = ev.sources[k].samples[i]
            last = max(j for j, m in enumerate(s.messages) if m["role"] == "assistant")
            n_img = sum(m["content"].count("<image>") for m in s.messages[:last])
            convs.append(Conversation(s.messages[:last], s.images[:n_img], "auto"))
            refs.append(str(s.meta.get("answer", parse_completion(s.messages[last]["content"], "auto").answer)))
            tasks.append(str(s.meta.get("task", "all")))
        for r, ref, task in zip(cm.chat_batch(convs, params), refs, tasks):
            ok = norm_answer(r.answer) == norm_answer(ref)
            for key in {task, "all"}:
                hits[key] += ok
                totals[key] += 1
    out = {"eval/answer_acc": hits["all"] / max(totals["all"], 1)}
    out.update({f"eval/answer_acc/{t}": hits[t] / totals[t] for t in totals if t != "all"})
    return out


# ---- one stage -----------------------------------------------------------------------------


def train_stage(cfg: TrainConfig, name: str, stage: StageConfig, source: Path | None, tokenizer: Tokenizer, d: Dist, resume: bool) -> Path:
    stage_dir = Path(cfg.run_dir) / name
    resume_from = ckpt_io.latest_checkpoint(stage_dir) if resume else None
    lora = "lora" in stage.train
    mc = model_config(cfg, source, tokenizer)
    if stage.data.max_len > mc.decoder.max_position_embeddings:
        raise ConfigError(f"stages.{name}.data.max_len ({stage.data.max_len}) exceeds the model's {mc.decoder.max_position_embeddings} positions")
    encoder = SampleEncoder(tokenizer, image_config(mc), stage.data.max_len)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    say(d, f"== stage {name}" + (f" (resuming from {resume_from})" if resume_from else ""))
    sources = measure(stage.data.datasets, encoder, d)
    say(d, describe(sources, "data"))
    if not any(s.usable for s in sources):
        raise ConfigError(f"stages.{name}: no usable sample in the data")
    plan = plan_stage(stage, sources, cfg.seed, d.world)
    ev = build_eval(cfg, stage, encoder, d)
    if ev is not None:
        say(d, describe(ev.sources, "eval data"))
        if cfg.eval.generate and d.enabled:
            say(d, "note: eval.generate (answer accuracy) runs in single-process runs only; skipped")
    per_rank = plan.per_step // d.world
    say(d, f"plan: {plan.steps} steps x {plan.per_step} micro-batches of <= {stage.data.batch_tokens} tokens "
           f"({'packed' if stage.data.packing else 'padded'}), {plan.epochs} epoch(s), {d.world} process(es), "
           f"{per_rank} micro-batch(es) per process per step")

    model = build_model(cfg, stage, mc, source, resume_from)
    say(d, f"parts ({'LoRA r=' + str(cfg.lora.rank) + ', ' if lora else ''}{cfg.model.dtype} weights, {cfg.precision} compute):\n"
           + format_table(parameter_table(model, stage)))
    model.to(d.device)
    if d.enabled:
        shard_model(model, d, torch.bfloat16 if cfg.precision == "bfloat16" else None)
    optimizer = build_optimizer(model, stage)

    start, counters = 0, Counter()
    if resume_from is not None:
        state, optim_state = ckpt_io.load_trainer_state(resume_from, d)
        load_optimizer_state(model, optimizer, optim_state)
        start = state["step"]
        counters.update(state.get("counters", {}))
        if state.get("total_steps") != plan.steps:
            say(d, f"warning: the plan now has {plan.steps} steps, the checkpoint was made with {state.get('total_steps')}")
    log = MetricsLog(stage_dir, d.main, cfg.log.tensorboard, resume_step=start if resume_from else None)

    indices = [s * plan.per_step + d.rank * per_rank + a for s in range(start, plan.steps) for a in range(per_rank)]
    batches = iter(loader(MicroBatches(plan.micro, sources, encoder, indices, pad_id), stage.data.num_workers))
    bar = tqdm(total=plan.steps, initial=start, desc=name, disable=not (d.main and cfg.log.progress), dynamic_ncols=True)
    saved_at = start if resume_from is not None else -1

    def save(step: int) -> None:
        nonlocal saved_at
        state = {"stage": name, "total_steps": plan.steps, "micro_batch": step * plan.per_step, "counters": dict(counters)}
        path = ckpt_io.save_training_checkpoint(stage_dir, step, model, optimizer, state, tokenizer, d, cfg.checkpoint.keep, lora)
        saved_at = step
        say(d, f"saved {path}")

    if ev is not None and cfg.eval.at_start and start == 0:
        record = {"step": 0, **evaluate(model, ev, encoder, cfg, tokenizer, d, pad_id)}
        say(d, "eval at start: " + ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in record.items() if k != "step"))
        log.write(record)
    done = start
    try:
        for step in range(start, plan.steps):
            t0 = time.perf_counter()
            factor = lr_factor(step, plan.steps, stage)
            set_lr(optimizer, factor)
            mbs = [next(batches) for _ in range(per_rank)]
            local_targets = sum(b.num_targets for b in mbs)
            (n_targets,) = d.sum([local_targets])
            loss_sum = correct = 0.0
            for a, b in enumerate(mbs):
                set_gradient_sync(model, a == per_rank - 1)
                b = b.to(d.device)
                with autocast(cfg, d.device):
                    l, c = loss_terms(model, b, cfg.loss_chunk_tokens)
                # FSDP averages gradients over processes; * world makes the step's gradient the
                # gradient of (sum of token losses / tokens in the whole step), whatever the split.
                (l * (d.world / max(n_targets, 1))).backward()
                loss_sum, correct = loss_sum + float(l.detach()), correct + float(c)
            grad_norm = clip_grad_norm(model, stage.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)
            dt = time.perf_counter() - t0
            skipped = sum((Counter(b.skipped) for b in mbs), Counter())
            totals = d.sum([loss_sum, correct, sum(b.num_tokens for b in mbs), sum(b.num_images for b in mbs),
                            sum(b.num_samples for b in mbs), *(skipped[r] for r in SKIP_REASONS)])
            loss_total, correct_total, tokens, images, samples = totals[:5]
            counters.update({"tokens": int(tokens), "images": int(images), "samples": int(samples)})
            counters.update({f"skipped_{r}": int(v) for r, v in zip(SKIP_REASONS, totals[5:]) if v})
            record = {
                "step": step + 1,
                "train/loss": loss_total / max(n_targets, 1),
                "train/token_acc": correct_total / max(n_targets, 1),
                "train/grad_norm": grad_norm,
                **{f"lr/{g['part']}": g["lr"] for g in optimizer.param_groups},
                "perf/tokens_per_s": tokens / dt,
                "perf/images_per_s": images / dt,
                "perf/step_s": dt,
                "perf/peak_mem_gb": peak_memory_gb(d.device),
                "data/tokens_seen": counters["tokens"],
                "data/targets": int(n_targets),
            }
            bar.update(1)
            bar.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{max(g['lr'] for g in optimizer.param_groups):.2e}")
            if ev is not None and cfg.eval.every and done % cfg.eval.every == 0 and done < plan.steps:
                record.update(evaluate(model, ev, encoder, cfg, tokenizer, d, pad_id))
            if done % cfg.log.every == 0 or done == plan.steps or any(k.startswith("eval/") for k in record):
                log.write(record)
            if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < plan.steps:
                save(done)
    except KeyboardInterrupt:
        if not d.enabled and done > max(saved_at, 0):
            say(d, "interrupted: saving a checkpoint of the completed steps")
            save(done)
        raise
    finally:
        bar.close()

    peaks = d.sum([peak_memory_gb(d.device) if r == d.rank else 0.0 for r in range(d.world)])
    say(d, "peak memory per process (GiB): " + " ".join(f"{p:.3f}" for p in peaks))
    final_record = {"step": plan.steps}
    if ev is not None:
        final_record.update(evaluate(model, ev, encoder, cfg, tokenizer, d, pad_id))
        say(d, "eval: " + ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in final_record.items() if k != "step"))
        log.write(final_record)
    if saved_at != plan.steps:
        save(plan.steps)
    final = export_final(model, stage_dir / "final", tokenizer, cfg, d, lora)
    log.close()
    if d.main and cfg.log.plot:
        plot_metrics(log.path, stage_dir / "curves.png", f"{Path(cfg.run_dir).name} / {name}")
    say(d, f"stage {name} done: {final}")
    return final


def export_final(model, out: Path, tokenizer: Tokenizer, cfg: TrainConfig, d: Dist, lora: bool) -> Path:
    weights = full_model_state(model, d)
    if d.main:
        if lora:
            weights = merge_state_dict(weights, lora_scales(model))
        dtype = DTYPES[cfg.checkpoint.export_dtype] if cfg.checkpoint.export_dtype else None
        save_checkpoint(StateView(model.cfg, weights), out, tokenizer=tokenizer, dtype=dtype)
    d.barrier()
    return out


# ---- the run -------------------------------------------------------------------------------


def device_memory(cfg: TrainConfig, d: Dist) -> int | None:
    """Memory one process may use: `device_memory` from the config, else the GPU's total, else
    the host's available memory shared by this node's processes."""
    if cfg.device_memory:
        return parse_size(cfg.device_memory)
    if d.device.type == "cuda":
        return torch.cuda.get_device_properties(d.device).total_memory
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                local = int(os.environ.get("LOCAL_WORLD_SIZE", d.world))
                return int(line.split()[1]) * 1024 // max(local, 1)
    except OSError:
        pass
    return None


def check_memory(cfg: TrainConfig, mc: Phi4RVConfig, d: Dist) -> None:
    """Refuse, before any weight is read, a stage that the memory plan says cannot fit."""
    budget = device_memory(cfg, d)
    if budget is None:
        return
    for name in cfg.stages:
        plan = plan_memory(cfg, name, mc, d.world, d.device.type, budget)
        if not plan.fits:
            options = options_that_fit(cfg, name, mc, d.world, d.device.type, budget)
            raise ConfigError(
                f"stages.{name} needs ~{gib(plan.total)} per process but {gib(budget)} is available "
                f"({', '.join(f'{k} {gib(v)}' for k, v in plan.parts.items())}); "
                + ("it would fit with: " + "; ".join(options) if options else "no usual change makes it fit")
                + " (`phi4rv train CONFIG --plan` for the whole plan)"
            )


def run(cfg: TrainConfig, resume: bool = False) -> dict[str, Path]:
    """Run every stage of `cfg` in order; returns each stage's final checkpoint folder."""
    run_dir = Path(cfg.run_dir)
    if not resume and (any(run_dir.glob("*/step-*")) or any(run_dir.glob("*/final"))):
        raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume {run_dir} to continue, or choose another run_dir")
    d = init_distributed(cfg.device)
    try:
        for name, stage in cfg.stages.items():  # the checks that need the process count
            per_step = (stage.data.tokens_per_step or stage.data.batch_tokens * d.world) // stage.data.batch_tokens
            if per_step % d.world:
                raise ConfigError(
                    f"stages.{name}.data.tokens_per_step ({stage.data.tokens_per_step}) must be a multiple of "
                    f"batch_tokens x processes ({stage.data.batch_tokens} x {d.world})"
                )
        tokenizer = load_tokenizer(cfg)
        check_memory(cfg, model_config(cfg, None, tokenizer), d)
        if d.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(cfg.dump())
        finals: dict[str, Path] = {}
        source: Path | None = None
        for name, stage in cfg.stages.items():
            final = run_dir / name / "final"
            if resume and (final / "config.json").is_file():
                say(d, f"== stage {name}: already complete ({final})")
            else:
                final = train_stage(cfg, name, stage, source, tokenizer, d, resume)
            finals[name] = final
            source = final
        return finals
    finally:
        shutdown(d)


def saved_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"nothing to resume: no config.yaml in {run_dir}")
    return yaml.safe_load(path.read_text())
