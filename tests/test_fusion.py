"""Mid-fusion: placeholder expansion, image order across a batch, loss masking, bidirectional flag."""

import pytest
import torch
import torch.nn.functional as F

from phi4rv.config import preset
from phi4rv.model import Phi4RV
from phi4rv.processing.tokens import IGNORE_INDEX, IMAGE_TOKEN_ID, expand_image_tokens
from phi4rv.train.loss import mean_loss

I = IMAGE_TOKEN_ID


def tiny(bidirectional=False, seed=0):
    cfg = preset("tiny")
    cfg.decoder.vocab_size = 300
    cfg.image_bidirectional_attention = bidirectional
    torch.manual_seed(seed)
    m = Phi4RV(cfg)
    m.init_weights(std=0.2)
    return m.eval()


def images(*grids, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(h * w, 768, generator=g) * 2 - 1 for h, w in grids], list(grids)


def test_expand_image_tokens():
    assert expand_image_tokens([1, I, 2, I], [(1, 2), (2, 1)]) == [1, I, I, 2, I, I]
    assert expand_image_tokens([1, 2], []) == [1, 2]
    with pytest.raises(ValueError, match="2 <image> tag"):
        expand_image_tokens([I, I], [(1, 1)])


def test_batch_with_different_image_counts_equals_each_sample_alone():
    """In float64: batched and single matmuls sum in different orders, which in float32 moves
    logits of size ~6 by ~1e-5 (a bound there flakes between machines); in float64 that noise is
    ~1e-14, so any difference above 1e-9 is a real leak across padding or images."""
    model = tiny().double()
    pix, grids = images((2, 3), (1, 4), (3, 3))
    pix = [p.double() for p in pix]
    samples = [
        ([5, 6, 7, 8], []),  # text only
        ([5, I, 9], [0]),  # one image
        ([I, 4, I, 10, 11], [1, 2]),  # two images
    ]
    seqs = [expand_image_tokens(ids, [grids[i] for i in idx]) for ids, idx in samples]
    t = max(map(len, seqs))
    batch = torch.full((3, t), 0)
    valid = torch.zeros((3, t), dtype=torch.bool)
    for r, s in enumerate(seqs):  # left padding
        batch[r, t - len(s) :] = torch.tensor(s)
        valid[r, t - len(s) :] = True
    with torch.no_grad():
        together = model(batch, torch.cat(pix), grids, padding_mask=valid)
        for r, (s, (_, idx)) in enumerate(zip(seqs, samples)):
            alone = model(torch.tensor([s]), torch.cat([pix[i] for i in idx]) if idx else None, [grids[i] for i in idx])
            assert (together[r, t - len(s) :] - alone[0]).abs().max() < 1e-9


def test_image_features_land_in_order():
    model = tiny()
    pix, grids = images((1, 2), (1, 1))
    ids = torch.tensor([[3, I, I, 4, I]])
    with torch.no_grad():
        x = model.embed(ids, model.encode_images(torch.cat(pix), grids))
        feats = model.encode_images(torch.cat(pix), grids)
    assert torch.equal(x[0, [1, 2, 4]], feats)
    assert torch.equal(x[0, 0], model.decoder.embed_tokens.weight[3])


def test_loss_ignores_image_positions():
    model = tiny()
    pix, grids = images((2, 2))
    ids = torch.tensor([[3, 4] + [I] * 4 + [7, 8, 9]])
    labels = ids.clone()  # image positions deliberately not -100: the loss must mask them itself
    with torch.no_grad():
        loss = mean_loss(model, ids, labels, torch.cat(pix), grids)
        logits = model(ids, torch.cat(pix), grids)
    target = labels.masked_fill(ids == I, IGNORE_INDEX)[0, 1:]
    keep = target != IGNORE_INDEX
    ref = F.cross_entropy(logits[0, :-1][keep], target[keep])
    assert keep.sum() == 4 and torch.allclose(loss, ref, atol=1e-6)


def test_bidirectional_flag_lets_patches_see_later_patches_of_their_image_only():
    grids = [(1, 3), (1, 2)]
    feats = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[3, I, I, I, 4, I, I, 5]])

    def moved_by(model, row):
        model.encode_images = lambda pixels, grids: pixels  # feed projected features directly
        changed = feats.clone()
        changed[row] += 1.0
        with torch.no_grad():
            return (model(ids, feats, grids) - model(ids, changed, grids)).abs().amax(-1)[0]

    for flag in (False, True):
        moved = moved_by(tiny(bidirectional=flag), row=2)  # last patch of image 1
        assert moved[0] == 0  # text before the image never sees it
        assert bool(moved[1] > 0) == flag and bool(moved[2] > 0) == flag  # earlier patches: only if bidirectional
        assert moved[3:].min() > 0  # the patch itself and everything after it
    moved = moved_by(tiny(bidirectional=True), row=4)  # last patch of image 2
    assert moved[:5].max() == 0 and moved[5] > 0  # never reaches image 1 or the text between


def test_forward_refuses_padded_and_packed_rows_at_once():
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match="not both"):
        tiny()(ids, padding_mask=torch.ones_like(ids, dtype=torch.bool), segment_ids=torch.ones_like(ids))
