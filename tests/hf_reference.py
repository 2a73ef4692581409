"""Builders for transformers' reference models (test-only dependency) matching a phi4rv config."""

import torch
from transformers import Phi3Config, Phi3ForCausalLM, Siglip2VisionConfig, Siglip2VisionModel

from phi4rv.config import DecoderConfig, VisionConfig


def hf_phi3(cfg: DecoderConfig, seed: int = 0) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    hf_cfg = Phi3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        original_max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        partial_rotary_factor=cfg.partial_rotary_factor,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    model = Phi3ForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():  # HF inits RMSNorm weights to ones; randomise so the test sees them
        for n, p in model.named_parameters():
            if n.endswith("layernorm.weight") or n == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    return model


def hf_siglip2(cfg: VisionConfig, seed: int = 0) -> Siglip2VisionModel:
    torch.manual_seed(seed)
    hf_cfg = Siglip2VisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_hidden_layers=cfg.num_hidden_layers,
        patch_size=cfg.patch_size,
        num_patches=cfg.num_patches,
        layer_norm_eps=cfg.layer_norm_eps,
        attn_implementation="eager",
    )
    model = Siglip2VisionModel(hf_cfg).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(1.0 if n.endswith("weight") else 0.0, 0.1)
    return model
