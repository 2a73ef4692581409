"""The recipe's steps; each takes the `Runner` and returns its JSON summary."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from phi4rv.data.formats import Sample, read_samples, write_parquet
from phi4rv.processing.reasoning import MODES
from phi4rv.recipe import data as world
from phi4rv.recipe.heldout import HeldOut
from phi4rv.recipe.report import render
from phi4rv.recipe.runner import Runner, stage, train_config


def write_shard(samples: list[Sample], folder: Path) -> Path:
    """`samples` as the one shard of a dataset folder."""
    folder.mkdir(parents=True, exist_ok=True)
    write_parquet(samples, folder / "shard-00000.parquet")
    return folder


def make_tokenizer(r: Runner) -> dict[str, Any]:
    """Byte-level BPE learned from the recipe's own text (none of stage 0's held-out prompts),
    Phi-4's special tokens after it."""
    from phi4rv.processing.byte_tokenizer import build_byte_tokenizer, template_with_system
    from phi4rv.processing.tokenizer import Tokenizer

    p, d = r.p, r.p.difficulty()
    held = HeldOut().add(text_heldout(r))
    samples = (world.reasoning_text(2000, r.seed + 101, leaks=held.holds) + world.task_samples(world.TASKS, 100, r.seed + 102, d)
               + world.alignment_samples(300, r.seed + 103, d) + world.stage3_samples(300, r.seed + 104, d))
    corpus = [m["content"] for s in samples for m in s.messages] + ["system user assistant " + p.system_prompt] * 50
    build_byte_tokenizer(r.tokenizer, template_with_system(p.system_prompt), corpus, p.vocab_size)
    return {"vocab_size": Tokenizer.from_dir(r.tokenizer).vocab_size}


def text_heldout(r: Runner) -> list[Sample]:
    """Stage 0's held-out reasoning text (its answer accuracy is reported)."""
    return world.reasoning_text(r.p.text_heldout, r.seed + 2)


def make_data(r: Runner) -> dict[str, Any]:
    """synth -> curate -> 20/80 mixture with held-out and validation splits; plus the stage-0 text
    and caption pairs, stage-1 captions and stage-3 samples. Every evaluation set (stage 2's
    held-out and validation splits, stage 0's held-out text and caption pairs) goes into one
    registry (`data/heldout.json`) first, and no training set of any stage holds one of its
    images (by pixels) or text prompts."""
    from phi4rv.data.curate import CurateConfig, curate
    from phi4rv.data.mix import MixConfig, image_key, write_mixture
    from phi4rv.data.synth.writer import write_synthetic

    p, d, seed = r.p, r.p.difficulty(), r.seed
    synth = r.data("synth")
    n = write_synthetic(list(world.PERCEPTION), p.per_perception_task, seed, d, synth / "perception")["samples"]
    n += write_synthetic(list(world.REASONING), p.per_reasoning_task, seed, d, synth / "reasoning")["samples"]
    # exact duplicates only: an 8x8 dHash cannot tell a 3 from an 8 on a 16 px card, so "near
    # duplicates" here are different questions
    report = curate([synth / "perception", synth / "reasoning"], CurateConfig(seed=seed, near_duplicate_bits=-1),
                    r.data("clean"))
    manifest = write_mixture(MixConfig(datasets=[(str(r.data("clean")), 1.0)], think_ratio=p.think_ratio,
                                       heldout=p.heldout, validation=p.validation, seed=seed, tokenizer=str(r.tokenizer)),
                             r.data("mix"))
    splits = manifest["splits"]
    mix = r.data("mix")
    text_held = text_heldout(r)
    held = list(read_samples(mix / "heldout"))
    registry = HeldOut().add(held).add(read_samples(mix / "val")).add(text_held)
    registry.save(r.data("heldout.json"))
    # stage 0's retrieval test: the held-out split's own images, each once, with their readings
    caption_held = list({image_key(s.images[0]): (s.images[0], s.meta["reading"]) for s in held}.values())[: p.caption_heldout]
    leaks = registry.holds
    write_shard(text_held, r.data("text_heldout"))
    write_shard(world.reasoning_text(p.text_samples, seed + 1, leaks=leaks), r.data("text"))
    write_shard(world.caption_samples(caption_held, "caption-heldout"), r.data("captions_heldout"))
    write_shard(world.caption_samples(world.caption_pairs(p.caption_pairs, seed + 5, d, registry.holds_image), "caption"),
                r.data("captions"))
    write_shard(world.alignment_samples(p.align_samples, seed + 3, d, registry.holds_image), r.data("align"))
    write_shard(world.stage3_samples(p.stage3_samples, seed + 4, d, leaks=leaks), r.data("stage3"))
    if any(leaks(s) for s in read_samples(mix / "train")):  # the mixture splits by image: cannot happen
        raise AssertionError("stage 2's training split holds a held-out image")
    return {"synth": n, "kept": report["kept"], "train": splits["train"]["samples"], "heldout": splits["heldout"]["samples"],
            "val": splits["val"]["samples"], "think_ratio": splits["train"]["think_ratio"], "text": p.text_samples,
            "align": p.align_samples, "stage3": p.stage3_samples,
            "registry": {"images": len(registry.images), "prompts": len(registry.prompts)}}


def _answer_accuracy(model_dir: Path, samples: list[Sample], mode: str, max_new_tokens: int, batch: int) -> float:
    from phi4rv.chat_model import ChatModel, Conversation
    from phi4rv.generation.sampling import SamplingParams

    cm = ChatModel.load(model_dir)
    params = cm.params(max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=0))
    right = 0
    for k in range(0, len(samples), batch):
        chunk = samples[k : k + batch]
        results = cm.chat_batch([Conversation(s.messages[:-1], list(s.images), mode) for s in chunk], params)
        right += sum(res.answer.strip() == s.meta["answer"] for res, s in zip(results, chunk))
    return right / max(1, len(samples))


def pretrain_decoder(r: Runner) -> dict[str, Any]:
    """Stage 0: a tiny reasoning decoder, next-token training on worked reasoning in text."""
    from phi4rv.train import train

    p = r.p
    model = {"preset": "tiny", "tokenizer": str(r.tokenizer), "overrides": dict(p.model)}
    stages = {"reasoning": stage({"decoder": p.text_lr}, [(r.data("text"), 1.0)], p, p.text_epochs, warmup_steps=30)}
    finals = train(train_config(r.out / "stage0_decoder", model, stages, r.seed))
    heldout = list(read_samples(r.data("text_heldout")))
    acc = _answer_accuracy(finals["reasoning"], heldout, "think", p.max_new_tokens, p.eval_batch)
    return {"checkpoint": str(finals["reasoning"]), "answer_acc": acc, "steps": stage_steps(finals["reasoning"].parent)}


def stage_steps(stage_dir: Path) -> int:
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return max(json.loads(x)["step"] for x in lines) if lines else 0


def pretrain_vision_encoder(r: Runner) -> dict[str, Any]:
    """Stage 0: the vision encoder by sigmoid contrastive loss; then both halves in one checkpoint."""
    from phi4rv.checkpoint import load_model, save_checkpoint
    from phi4rv.processing.image import ImageProcessorConfig
    from phi4rv.processing.tokenizer import Tokenizer
    from phi4rv.recipe.contrastive import ContrastiveConfig, pretrain_vision

    p = r.p
    base = load_model(json.loads((r.steps_dir / "stage0_decoder.json").read_text())["checkpoint"])
    image_cfg = ImageProcessorConfig.from_model(base.cfg)
    pairs = [(s.images[0], s.meta["answer"]) for s in read_samples(r.data("captions"))]
    heldout = [(s.images[0], s.meta["answer"]) for s in read_samples(r.data("captions_heldout"))]
    state, info = pretrain_vision(base.cfg.vision, pairs, heldout, image_cfg,
                                  ContrastiveConfig(steps=p.contrastive_steps, batch=p.contrastive_batch, seed=r.seed))
    base.vision.load_state_dict(state)
    save_checkpoint(base, r.out / "stage0_base", Tokenizer.from_dir(r.tokenizer))
    (r.out / "stage0_vision_loss.json").write_text(json.dumps(info["loss"]) + "\n")
    return {"checkpoint": str(r.out / "stage0_base"), "steps": p.contrastive_steps,
            **{k: v for k, v in info.items() if k != "loss"}, "final_loss": info["loss"][-1]}


def stage_configs(r: Runner) -> dict[str, dict]:
    """Stage 1 (captions: "list the cards" -> the reading), 2 (projector and decoder, the
    mixture), 3 (two-image questions and refusals, with replay of stage-2 data).

    Unlike the paper's stage 1, the decoder trains along with the projector (at a third of its
    rate): reading every card in order is the densest reading signal the recipe has, and with the
    decoder frozen until stage 2, whether the tiny decoder learned to read a digit off its card
    within stage 2's budget swung with the machine (perception 62% on one, 91% on another, one
    seed). Read back after stage 1 ("list the cards" on 96 held-out images, greedy): projector
    only for 1 epoch, 33% of cards right and no image read whole (seed 0); with the decoder for 2
    epochs, 92%, 95%, 93% of cards and 79%, 88%, 82% of images read whole (seeds 0, 1, 2).

    Unlike the paper's stage 2, the vision encoder stays as stage 0 left it: trained along with
    the decoder at lr 5e-4, the tiny encoder lost the digits before the decoder had learned to
    read them (a linear probe for the digit on the projected features fell from 99.9% to 41-64%)."""
    p, mix = r.p, r.data("mix")
    return {
        "alignment": stage({"projector": 3e-3, "decoder": 1e-3}, [(r.data("align"), 1.0)], p, p.align_epochs),
        "instruction": stage({"projector": 2e-3, "decoder": 2e-3}, [(mix / "train", 1.0)], p,
                             p.instruction_epochs, weight_decay=0.01),
        "long": stage({"projector": 5e-4, "decoder": 5e-4},
                      [(r.data("stage3"), 1.0), (mix / "train", 0.25)], p, p.stage3_epochs),
    }


def train_stages(r: Runner) -> dict[str, Any]:
    from phi4rv.train import train

    base = json.loads((r.steps_dir / "stage0_vision.json").read_text())["checkpoint"]
    run_dir = r.out / "stages"
    finals = train(train_config(run_dir, {"checkpoint": base}, stage_configs(r), r.seed, r.data("mix") / "val"))
    shutil.rmtree(r.model, ignore_errors=True)
    shutil.copytree(finals["long"], r.model)
    return {"model": str(r.model), "stages": {name: {"steps": stage_steps(path.parent), "final": str(path)}
                                               for name, path in finals.items()}}


# ---- evaluation --------------------------------------------------------------------------------


def evaluate(r: Runner, model: Path | None = None, out: Path | None = None,
             modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    """The held-out split in each mode through `phi4rv eval`; the mode table from its records."""
    from phi4rv.eval.backends import LocalBackend
    from phi4rv.eval.report import write_report
    from phi4rv.eval.runner import RunConfig, run_eval
    from phi4rv.eval.tasks.synthetic import Synthetic

    out = out or r.out / "eval"
    cfg = RunConfig(out=out, tasks=[Synthetic()], modes=list(modes), limit=r.p.eval_limit, seed=r.seed,
                    data_paths={"synthetic": r.data("mix") / "heldout"}, max_new_tokens=r.p.max_new_tokens)
    run_eval(cfg, LocalBackend(model or r.model, batch_size=r.p.eval_batch))
    write_report([out], out / "report")
    return mode_table(out, modes)


def mode_table(eval_dir: Path, modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    """Per mode and kind: accuracy, mean output tokens, mean seconds; in auto, how often the model
    chose think for reasoning and nothink for perception questions."""
    from phi4rv.eval.records import read_records, records_path

    table: dict[str, Any] = {}
    for mode in modes:
        recs = list(read_records(records_path(eval_dir, "synthetic", mode)).values())
        by: dict[str, list[dict]] = defaultdict(list)
        for rec in recs:
            by[rec["groups"]["kind"]].append(rec)
            by["task:" + rec["groups"]["task"]].append(rec)
        by["all"] = recs
        row = {}
        for key, group in sorted(by.items()):
            tokens = [rec["tokens"].get("output", 0) for rec in group if rec.get("tokens")]
            row[key] = {
                "n": len(group),
                "accuracy": 100 * sum(rec["score"] for rec in group) / max(1, len(group)),
                "tokens": sum(tokens) / max(1, len(tokens)),
                "seconds": sum(rec["times"].get("total", 0.0) for rec in group) / max(1, len(group)),
                "think_share": 100 * sum(rec["answered_mode"] == "think" for rec in group) / max(1, len(group)),
            }
        table[mode] = row
    if "auto" in table:
        recs = list(read_records(records_path(eval_dir, "synthetic", "auto")).values())
        right = [(rec["answered_mode"] == "think") == (rec["groups"]["kind"] == "reasoning") for rec in recs]
        table["auto_choice"] = 100 * sum(right) / max(1, len(right))
    return table


def write_report(r: Runner, results: dict[str, Any]) -> dict[str, Any]:
    path = r.out / "REPORT.md"
    path.write_text(render(r, results))
    return {"path": str(path)}

