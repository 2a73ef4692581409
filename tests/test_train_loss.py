"""Chunked LM-head cross-entropy equals torch's cross-entropy over the full logits: loss, argmax hits, gradients."""

import pytest
import torch
import torch.nn.functional as F

from phi4rv.config import preset
from phi4rv.data.dataset import Example
from phi4rv.data.packing import collate
from phi4rv.model.vlm import Phi4RV
from phi4rv.processing.tokens import IGNORE_INDEX
from phi4rv.train.loss import chunked_cross_entropy, loss_terms
from phi4rv.train.toy import TINY_OVERRIDES


def reference(h, w, t):
    logits = F.linear(h, w).float()
    return F.cross_entropy(logits, t, reduction="sum"), (logits.argmax(-1) == t).sum()


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
def test_equals_full_logits_loss_and_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(101, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 101, (37,), generator=g)
    t[:15] = (h[:15] @ w.T).argmax(-1)  # some hits
    loss, correct = chunked_cross_entropy(h, w, t, chunk)
    (loss * 0.5).backward()  # a scale, as the loop's normalisation
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref_loss, ref_correct = reference(h, w, t)
    (ref_loss * 0.5).backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert int(correct) == int(ref_correct) > 0
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)


def test_frozen_head_and_bfloat16_autocast():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(50, 32, generator=g, requires_grad=True)
    w = torch.randn(300, 32, generator=g) * 0.2  # frozen: no gradient asked for
    t = torch.randint(0, 300, (50,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_cross_entropy(h, w, t, 8)
        ref, _ = reference(h, w, t)
    loss.backward()
    gh = h.grad.clone()
    h.grad = None
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)
    torch.testing.assert_close(gh, h.grad, rtol=2e-2, atol=2e-3)


def test_model_loss_terms_chunked_equal_unchunked():
    torch.manual_seed(0)
    mc = preset("tiny")
    for k, v in TINY_OVERRIDES.items():
        *path, leaf = k.split(".")
        node = mc
        for p in path:
            node = getattr(node, p)
        setattr(node, leaf, v)
    mc.decoder.vocab_size = 512
    model = Phi4RV(mc)
    model.init_weights()
    rows = []
    for r in range(3):
        ids = torch.randint(0, mc.decoder.vocab_size, (20 + r,)).tolist()
        targets = [IGNORE_INDEX] * 8 + ids[9:] + [IGNORE_INDEX]
        rows.append([Example(f"s{r}", ids, targets, [], [], "nothink")])
    batch = collate(rows)
    grads = []
    for chunk in (0, 7):
        model.zero_grad(set_to_none=True)
        loss, correct = loss_terms(model, batch, chunk)
        loss.backward()
        grads.append((loss.item(), int(correct), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, c0, g0), (l1, c1, g1) = grads
    assert l1 == pytest.approx(l0, rel=1e-6) and c1 == c0
    assert g0.keys() == g1.keys() and "decoder.lm_head.weight" in g0 and "vision.embeddings.patch_embedding.weight" in g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5 * float(g0[n].abs().max()))
