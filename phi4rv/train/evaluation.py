"""Evaluation during training: loss and answer-token accuracy on the eval micro-batches (all
processes), and, in single-process runs, greedy answers scored by exact match."""

from __future__ import annotations

from collections import Counter

import torch

from phi4rv.data.dataset import SampleEncoder
from phi4rv.model.vlm import Phi4RV
from phi4rv.processing.answers import norm_text
from phi4rv.processing.reasoning import parse_completion
from phi4rv.processing.tokenizer import Tokenizer
from phi4rv.train.batches import EvalSet, MicroBatches, loader
from phi4rv.train.config import TrainConfig
from phi4rv.train.distributed import Dist
from phi4rv.train.loss import autocast, loss_terms


@torch.no_grad()
def evaluate(model: Phi4RV, ev: EvalSet, encoder: SampleEncoder, cfg: TrainConfig, tokenizer: Tokenizer, d: Dist,
             pad_id: int) -> dict:
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


def answer_accuracy(model: Phi4RV, ev: EvalSet, encoder: SampleEncoder, cfg: TrainConfig, tokenizer: Tokenizer) -> dict:
    """Greedy answers to the first `eval.generate` samples' last question, scored by exact match
    (`norm_text`) against the reference answer."""
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
            ok = norm_text(r.answer) == norm_text(ref)
            for key in {task, "all"}:
                hits[key] += ok
                totals[key] += 1
    out = {"eval/answer_acc": hits["all"] / max(totals["all"], 1)}
    out.update({f"eval/answer_acc/{t}": hits[t] / totals[t] for t in totals if t != "all"})
    return out
