"""The training loop: stages in order, each from the previous one's final weights.

A stage = plan its data (train.batches), build its model and optimizer (train.setup), run its
optimizer steps (`StageRun`), export the result in the release's format. Each optimizer step
gathers `tokens_per_step` worth of micro-batches (this process's share), normalises the loss by
the step's supervised-token count over all processes, accumulates, clips and steps; logging,
evaluation (train.evaluation) and checkpoints (train.checkpointing) run on schedule.
"""

from __future__ import annotations

import resource
import time
from collections import Counter
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from phi4rv.checkpoint import DTYPES
from phi4rv.data.dataset import SKIP_REASONS
from phi4rv.data.packing import Batch
from phi4rv.model.vlm import Phi4RV
from phi4rv.processing.image import ImageProcessorConfig
from phi4rv.processing.tokenizer import Tokenizer
from phi4rv.train import checkpointing as ckpt_io
from phi4rv.train.batches import MicroBatches, StageData, loader, plan_data
from phi4rv.train.config import ConfigError, StageConfig, TrainConfig
from phi4rv.train.distributed import (
    Dist,
    clip_grad_norm,
    init_distributed,
    say,
    set_gradient_sync,
    shutdown,
)
from phi4rv.train.evaluation import evaluate
from phi4rv.train.loss import autocast, loss_terms
from phi4rv.train.metrics import MetricsLog, plot_metrics
from phi4rv.train.setup import build_trainer, check_memory, load_tokenizer, model_config
from phi4rv.train.stages import lr_factor, set_lr
from phi4rv.train.stream import StreamedBatches, plan_streamed_data


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class StageRun:
    """One stage's optimizer steps, evaluations and checkpoints, from where a resumed checkpoint
    left off (or step 0) to the end of the plan."""

    def __init__(self, cfg: TrainConfig, name: str, stage: StageConfig, tokenizer: Tokenizer, d: Dist,
                 data: StageData, model: Phi4RV, optimizer: torch.optim.Optimizer, resume_from: Path | None):
        self.cfg, self.name, self.stage, self.tokenizer, self.d = cfg, name, stage, tokenizer, d
        self.data, self.model, self.optimizer = data, model, optimizer
        self.dir = Path(cfg.run_dir) / name
        self.lora = "lora" in stage.train
        self.start, self.counters = 0, Counter()
        if resume_from is not None:
            state = ckpt_io.load_training_checkpoint(resume_from, model, optimizer, d)
            self.start = state["step"]
            self.counters.update(state.get("counters", {}))
            if data.stream is not None:
                data.stream.restore(ckpt_io.read_data_state(resume_from))
            if state.get("total_steps") != data.plan.steps:
                say(d, f"warning: the plan now has {data.plan.steps} steps, the checkpoint was made with {state.get('total_steps')}")
        self.log = MetricsLog(self.dir, d.main, cfg.log.tensorboard, resume_step=self.start if resume_from else None)
        self.saved_at = self.start if resume_from is not None else -1
        self.done = self.start  # optimizer steps taken
        self.streamed: StreamedBatches | None = None

    def train(self) -> None:
        """Every remaining step, then the final evaluation and checkpoint (a checkpoint of the
        completed steps on Ctrl-C in a single-process run)."""
        cfg, d, plan, ev = self.cfg, self.d, self.data.plan, self.data.eval
        per_rank = self.data.per_rank(d)
        if self.data.stream is not None:
            self.streamed = StreamedBatches(self.data.stream, self.data.pad_id, plan.per_step, d, self.start, plan.steps,
                                            self.stage.data.num_workers)
            batches = iter(self.streamed)
        else:
            indices = [s * plan.per_step + d.rank * per_rank + a for s in range(self.start, plan.steps) for a in range(per_rank)]
            batches = iter(loader(MicroBatches(plan.micro, self.data.sources, self.data.encoder, indices, self.data.pad_id),
                                  self.stage.data.num_workers))
        bar = tqdm(total=plan.steps, initial=self.start, desc=self.name, disable=not (d.main and cfg.log.progress),
                   dynamic_ncols=True)
        if ev is not None and cfg.eval.at_start and self.start == 0:
            record = {"step": 0, **self.evaluate()}
            say(d, "eval at start: " + ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in record.items() if k != "step"))
            self.log.write(record)
        try:
            for step in range(self.start, plan.steps):
                record = self.step(step, [next(batches) for _ in range(per_rank)])
                done = self.done
                bar.update(1)
                bar.set_postfix(loss=f"{record['train/loss']:.4f}",
                                lr=f"{max(g['lr'] for g in self.optimizer.param_groups):.2e}")
                if ev is not None and cfg.eval.every and done % cfg.eval.every == 0 and done < plan.steps:
                    record.update(self.evaluate())
                if done % cfg.log.every == 0 or done == plan.steps or any(k.startswith("eval/") for k in record):
                    self.log.write(record)
                if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < plan.steps:
                    self.save(done)
        except KeyboardInterrupt:
            if not d.enabled and self.done > max(self.saved_at, 0):
                say(d, "interrupted: saving a checkpoint of the completed steps")
                self.save(self.done)
            raise
        finally:
            bar.close()
            if self.streamed is not None:
                batches.close()  # its worker pool

        if self.data.stream is not None:
            say(d, self.data.stream.describe())

        peaks = d.sum([peak_memory_gb(d.device) if r == d.rank else 0.0 for r in range(d.world)])
        say(d, "peak memory per process (GiB): " + " ".join(f"{p:.3f}" for p in peaks))
        if ev is not None:
            final_record = {"step": plan.steps, **self.evaluate()}
            say(d, "eval: " + ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in final_record.items() if k != "step"))
            self.log.write(final_record)
        if self.saved_at != plan.steps:
            self.save(plan.steps)

    def step(self, step: int, mbs: list[Batch]) -> dict:
        """One optimizer step over this process's micro-batches; returns the step's metrics."""
        d, model, optimizer, plan = self.d, self.model, self.optimizer, self.data.plan
        t0 = time.perf_counter()
        set_lr(optimizer, lr_factor(step, plan.steps, self.stage))
        (n_targets,) = d.sum([sum(b.num_targets for b in mbs)])
        loss_sum = correct = 0.0
        for a, b in enumerate(mbs):
            set_gradient_sync(model, a == len(mbs) - 1)
            b = b.to(d.device)
            with autocast(self.cfg, d.device):
                l, c = loss_terms(model, b, self.cfg.loss_chunk_tokens)
            # FSDP averages gradients over processes; * world makes the step's gradient the
            # gradient of (sum of token losses / tokens in the whole step), whatever the split.
            (l * (d.world / max(n_targets, 1))).backward()
            loss_sum, correct = loss_sum + float(l.detach()), correct + float(c)
        grad_norm = clip_grad_norm(model, self.stage.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.done = step + 1
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        dt = time.perf_counter() - t0
        skipped = sum((Counter(b.skipped) for b in mbs), Counter())
        totals = d.sum([loss_sum, correct, sum(b.num_tokens for b in mbs), sum(b.num_images for b in mbs),
                        sum(b.num_samples for b in mbs), *(skipped[r] for r in SKIP_REASONS)])
        loss_total, correct_total, tokens, images, samples = totals[:5]
        self.counters.update({"tokens": int(tokens), "images": int(images), "samples": int(samples)})
        self.counters.update({f"skipped_{r}": int(v) for r, v in zip(SKIP_REASONS, totals[5:]) if v})
        return {
            "step": step + 1,
            "train/loss": loss_total / max(n_targets, 1),
            "train/token_acc": correct_total / max(n_targets, 1),
            "train/grad_norm": grad_norm,
            **{f"lr/{g['part']}": g["lr"] for g in optimizer.param_groups},
            "perf/tokens_per_s": tokens / dt,
            "perf/images_per_s": images / dt,
            "perf/step_s": dt,
            "perf/peak_mem_gb": peak_memory_gb(d.device),
            "data/tokens_seen": self.counters["tokens"],
            "data/targets": int(n_targets),
        }

    def evaluate(self) -> dict:
        return evaluate(self.model, self.data.eval, self.data.encoder, self.cfg, self.tokenizer, self.d, self.data.pad_id)

    def save(self, step: int) -> None:
        plan = self.data.plan
        state = {"stage": self.name, "total_steps": plan.steps, "micro_batch": step * plan.per_step,
                 "per_step": plan.per_step, "counters": dict(self.counters), "streaming": self.data.stream is not None}
        data_state = self.streamed.state_at(step) if self.data.stream is not None else None
        path = ckpt_io.save_training_checkpoint(self.dir, step, self.model, self.optimizer, state, self.tokenizer, self.d,
                                                self.cfg.checkpoint.keep, self.lora, self.cfg.checkpoint.step_weights,
                                                data_state)
        self.saved_at = step
        say(self.d, f"saved {path}")


def check_resumable(state: dict, data: StageData, name: str, stage: StageConfig, d: Dist) -> None:
    """A checkpoint resumes at any process count as long as each optimizer step holds the same
    micro-batches: the step's samples are then those of the saved run whatever the split."""
    streamed = state.get("streaming", False)
    if streamed != (data.stream is not None):
        raise ConfigError(f"stages.{name}: the checkpoint was saved with data.streaming: {str(streamed).lower()}; "
                          "resume with the same setting")
    saved = state.get("per_step", data.plan.per_step)
    if saved != data.plan.per_step:
        raise ConfigError(
            f"stages.{name}: the checkpoint was saved at {state.get('world_size', 1)} process(es) with {saved} micro-batches a step, "
            f"at {d.world} this config makes {data.plan.per_step}: set stages.{name}.data.tokens_per_step="
            f"{saved * stage.data.batch_tokens} to resume the same steps"
        )


def train_stage(cfg: TrainConfig, name: str, stage: StageConfig, source: Path | None, tokenizer: Tokenizer, d: Dist,
                resume: bool) -> Path:
    """One stage: plan its data, build its model (from `source`, the previous stage's result, or
    from this stage's last checkpoint when resuming), run its steps, export the final weights."""
    stage_dir = Path(cfg.run_dir) / name
    resume_from = ckpt_io.latest_checkpoint(stage_dir) if resume else None
    mc = model_config(cfg, source, tokenizer)
    if stage.data.max_len > mc.decoder.max_position_embeddings:
        raise ConfigError(f"stages.{name}.data.max_len ({stage.data.max_len}) exceeds the model's {mc.decoder.max_position_embeddings} positions")
    say(d, f"== stage {name}" + (f" (resuming from {resume_from})" if resume_from else ""))
    data = (plan_streamed_data if stage.data.streaming else plan_data)(cfg, name, stage, ImageProcessorConfig.from_model(mc),
                                                                        tokenizer, d)
    if resume_from is not None:
        check_resumable(ckpt_io.read_state(resume_from), data, name, stage, d)
    model, optimizer = build_trainer(cfg, stage, mc, source, d)
    run = StageRun(cfg, name, stage, tokenizer, d, data, model, optimizer, resume_from)
    run.train()
    dtype = DTYPES[cfg.checkpoint.export_dtype] if cfg.checkpoint.export_dtype else None
    final = ckpt_io.export_release(model, stage_dir / "final", tokenizer, d, run.lora, dtype)
    run.log.close()
    if d.main and cfg.log.plot:
        plot_metrics(run.log.path, stage_dir / "curves.png", f"{Path(cfg.run_dir).name} / {name}")
    say(d, f"stage {name} done: {final}")
    return final


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
