"""Our model vs transformers' Phi3ForCausalLM and Siglip2VisionModel on random fp32 weights."""

import pytest
import torch
from hf_reference import hf_phi3, hf_siglip2

from phi4rv.config import DecoderConfig, VisionConfig
from phi4rv.model import Decoder, VisionEncoder
from phi4rv.model.vlm import attention_mask, default_positions

DECODERS = [
    DecoderConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0),
    DecoderConfig(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=1, rope_theta=10000.0, partial_rotary_factor=0.5),
    DecoderConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.75),
]


def our_decoder(cfg: DecoderConfig, hf) -> Decoder:
    ours = Decoder(cfg).eval()
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(sd, strict=True)
    return ours


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cfg", DECODERS, ids=["gqa", "mqa-partial-rope", "mha-partial-rope"])
def test_decoder_logits_match_phi3(cfg, seed):
    hf = hf_phi3(cfg, seed)
    ours = our_decoder(cfg, hf)
    ids = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours.lm_head(ours(ours.embed_tokens(ids), default_positions(None, ids)))
    assert (got - ref).abs().max() < 1e-5


@pytest.mark.parametrize("rows", [1, 4, 16, 40])
def test_lm_head_at_decode_rows_matches_phi3(rows):
    """Decode feeds the head one row per sequence; CPU fp32 inference runs it on oneDNN (`model.linear`)."""
    cfg = DECODERS[0]
    hf = hf_phi3(cfg, 4)
    ours = our_decoder(cfg, hf)
    h = torch.randn(rows, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        ref = hf.lm_head(h)
        got = ours.lm_head(h)
    assert got.shape == ref.shape == (rows, 1, cfg.vocab_size)
    assert (got - ref).abs().max() < 1e-5
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_decoder_left_padding_matches_phi3():
    cfg = DECODERS[0]
    hf = hf_phi3(cfg, 3)
    ours = our_decoder(cfg, hf)
    ids = torch.randint(3, cfg.vocab_size, (2, 12))
    pad = torch.ones_like(ids, dtype=torch.bool)
    pad[1, :5] = False
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=pad.long()).logits
        pos = default_positions(pad, ids)
        got = ours.lm_head(ours(ours.embed_tokens(ids), pos, attention_mask(pad, ids.shape[1])))
    assert not got.isnan().any()
    assert (got[pad] - ref[pad]).abs().max() < 1e-5


VISIONS = [
    VisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3),
    VisionConfig(hidden_size=48, intermediate_size=80, num_attention_heads=3, num_hidden_layers=2, patch_size=8, num_patches=64),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cfg", VISIONS, ids=["p16-grid16", "p8-grid8"])
def test_packed_vision_matches_siglip2_hidden_states_minus_2(cfg, seed):
    hf = hf_siglip2(cfg, seed)
    ours = VisionEncoder(cfg).eval()
    sd = {k: v for k, v in hf.state_dict().items() if not k.startswith("head.")}
    ours.load_state_dict(sd, strict=True)
    grids = [(7, 13), (20, 4), (1, 1)]
    g = torch.Generator().manual_seed(seed)
    pixels = [torch.rand(h * w, cfg.patch_dim, generator=g) * 2 - 1 for h, w in grids]
    longest = max(p.shape[0] for p in pixels)
    padded = torch.zeros(len(grids), longest, cfg.patch_dim)
    mask = torch.zeros(len(grids), longest, dtype=torch.long)
    for i, p in enumerate(pixels):
        padded[i, : len(p)] = p
        mask[i, : len(p)] = 1
    with torch.no_grad():
        out = hf(pixel_values=padded, pixel_attention_mask=mask, spatial_shapes=torch.tensor(grids),
                 output_hidden_states=True)
        ref = torch.cat([out.hidden_states[-2][i, : len(p)] for i, p in enumerate(pixels)])
        got = ours(torch.cat(pixels), grids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-5
