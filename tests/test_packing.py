"""Packing: per-sample losses are the same packed as alone; plans respect the budget and the order."""

import random

import pytest
import torch
import torch.nn.functional as F

from phi4rv.config import preset
from phi4rv.data.dataset import SampleEncoder
from phi4rv.data.packing import collate, pack_plan, pad_plan
from phi4rv.model import Phi4RV
from phi4rv.model.vlm import segment_positions
from phi4rv.processing.byte_tokenizer import build_byte_tokenizer
from phi4rv.processing.image import ImageProcessorConfig
from phi4rv.processing.tokenizer import Tokenizer
from phi4rv.processing.tokens import IGNORE_INDEX
from phi4rv.train.toy import TOY_TEMPLATE, add_sample, colour_sample


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    tok = Tokenizer.from_dir(build_byte_tokenizer(tmp_path_factory.mktemp("tok"), TOY_TEMPLATE))
    return SampleEncoder(tok, ImageProcessorConfig(min_num_patches=4, max_num_patches=64), max_len=400)


def tiny_model(vocab: int, bidirectional: bool = False) -> Phi4RV:
    cfg = preset("tiny")
    cfg.decoder.vocab_size = vocab
    cfg.image_bidirectional_attention = bidirectional
    torch.manual_seed(0)
    m = Phi4RV(cfg)
    m.init_weights(std=0.1)
    return m.eval()


def examples(encoder, n=6, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = (colour_sample if i % 3 else add_sample)(rng, f"s{i}")
        if i == 4:  # a two-image, two-turn sample
            s2 = colour_sample(rng, "x")
            s.messages += [{"role": "user", "content": "<image>\nAnd now?"}, s2.messages[1]]
            s.images += s2.images
        out.append(encoder.load_pixels(encoder.encode(s)))
    return out


def token_losses(model, batch):
    logits = model(**batch.model_inputs())
    return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none").view(batch.targets.shape)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_loss_equals_each_sample_alone(encoder, bidirectional):
    model = tiny_model(encoder.tokenizer.vocab_size, bidirectional)
    exs = examples(encoder)
    assert any(len(e.grids) == 2 for e in exs) and any(not e.grids for e in exs)
    # two rows, several samples each, images in both rows
    packed = collate([exs[:3], exs[3:]])
    assert packed.input_ids.shape[0] == 2 and packed.num_samples == 6
    with torch.no_grad():
        losses = token_losses(model, packed)
        for r, row in enumerate([exs[:3], exs[3:]]):
            start = 0
            for ex in row:
                alone = token_losses(model, collate([[ex]]))[0]
                together = losses[r, start : start + len(ex)]
                assert torch.allclose(together, alone, atol=1e-5, rtol=1e-5)
                mask = torch.tensor(ex.targets) != IGNORE_INDEX
                assert mask.sum() == ex.num_targets > 0
                assert abs(together[mask].mean() - alone[mask].mean()) < 1e-5
                start += len(ex)


def test_padded_batch_loss_equals_each_sample_alone(encoder):
    model = tiny_model(encoder.tokenizer.vocab_size)
    exs = examples(encoder, n=4, seed=1)
    padded = collate([[e] for e in exs])
    with torch.no_grad():
        losses = token_losses(model, padded)
        for r, ex in enumerate(exs):
            alone = token_losses(model, collate([[ex]]))[0]
            assert torch.allclose(losses[r, : len(ex)], alone, atol=1e-5, rtol=1e-5)
            assert (losses[r, len(ex) :] == 0).all()  # padding carries no loss


def test_targets_are_shifted_per_sample_and_never_cross_samples(encoder):
    exs = examples(encoder, n=3)
    b = collate([exs])
    ends = torch.cumsum(torch.tensor([len(e) for e in exs]), 0) - 1
    assert (b.targets[0, ends] == IGNORE_INDEX).all()  # last token of a sample predicts nothing
    assert (b.positions[0] == segment_positions(b.segment_ids)[0]).all()
    assert b.positions[0, 0] == 0 and b.positions[0, len(exs[0])] == 0
    assert b.num_tokens == sum(len(e) for e in exs)
    assert b.num_images == sum(len(e.grids) for e in exs)
    assert b.pixels.shape[0] == sum(h * w for e in exs for h, w in e.grids)


def test_pack_plan_fills_rows_in_order_within_budget():
    rng = random.Random(0)
    lengths = [rng.randint(5, 100) for _ in range(300)]
    plan = pack_plan(lengths, row_len=128, batch_tokens=512)
    seen = [i for mb in plan for row in mb for i in row]
    assert sorted(seen) == list(range(300))  # every sample exactly once
    for mb in plan:
        assert 1 <= len(mb) <= 4
        assert all(sum(lengths[i] for i in row) <= 128 for row in mb)
    # micro-batches follow the data order: every sample of one precedes every sample of the next
    firsts = [min(i for row in mb for i in row) for mb in plan]
    lasts = [max(i for row in mb for i in row) for mb in plan]
    assert all(a < b for a, b in zip(lasts, firsts[1:]))
    fill = sum(lengths) / (len(plan) * 512)
    assert fill > 0.75  # first fit over 4 rows of 128: about one short sample wasted per row
    with pytest.raises(ValueError, match="more than the row length"):
        pack_plan([10, 200], row_len=128, batch_tokens=512)


def test_pad_plan_respects_budget_counting_padding():
    lengths = [10, 50, 20, 100, 30, 30, 30, 30, 30]
    plan = pad_plan(lengths, batch_tokens=120)
    assert [i for mb in plan for (i,) in mb] == list(range(len(lengths)))
    for mb in plan:
        assert len(mb) * max(lengths[i] for (i,) in mb) <= 120


def test_segment_positions_restart_per_sample():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


def test_empty_batch_is_a_harmless_forward(encoder):
    model = tiny_model(encoder.tokenizer.vocab_size)
    b = collate([])
    assert b.num_targets == 0 and b.num_samples == 0
    assert torch.isfinite(model(**b.model_inputs())).all()


def test_logits_at_selects_the_same_logits(encoder):
    model = tiny_model(encoder.tokenizer.vocab_size)
    b = collate([examples(encoder, n=3)])
    scored = b.targets != IGNORE_INDEX
    with torch.no_grad():
        full = model(**b.model_inputs())
        some = model(**b.model_inputs(), logits_at=scored)
    assert some.shape == (int(scored.sum()), encoder.tokenizer.vocab_size)
    assert torch.allclose(some, full[scored], atol=1e-6)
