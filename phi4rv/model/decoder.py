"""Phi-3 architecture decoder (Phi-4-reasoning): fused qkv, GQA, partial RoPE, RMSNorm, fused gate|up.

Parameter names follow transformers' `Phi3ForCausalLM` (under `model.` / `lm_head`).
The forward pass takes embeddings (so the VLM can splice image features in), explicit positions
(so packed samples can restart them) and an optional boolean attention mask `[B, 1, T, S]`
(True = may attend); without a mask attention is causal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from phi4rv.config import DecoderConfig
from phi4rv.model.linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(cfg: DecoderConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for `positions` [B, T] -> two [B, T, rotary_dim] tables, computed in fp32."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, T, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, hd]; cos/sin: [B, T, r] rotate the first r dims, pass the rest through
    r = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    rot = x if r == x.shape[-1] else x[..., :r]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return rotated if r == x.shape[-1] else torch.cat((rotated, x[..., r:]), dim=-1)


class KVCache:
    """Preallocated keys/values for every layer: [B, kv_heads, max_len, head_dim].

    Rows of a batch share one write position (prompts are left-padded), so a step writes
    `k[:, :, pos:pos+T]` for all rows; the attention mask says which slots are real.
    """

    def __init__(self, cfg: DecoderConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.pos = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > {self.max_len} positions")
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch (finished sequences leave)."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.h, self.kvh, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (self.h + 2 * self.kvh) * self.hd, bias=False)
        self.o_proj = Linear(self.h * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, segments: list[list[int]] | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        # q and k heads side by side: one RoPE call rotates both (fewer small ops per decode step)
        qk, v = self.qkv_proj(x).split([(self.h + self.kvh) * self.hd, self.kvh * self.hd], dim=-1)
        qk = apply_rope(qk.view(b, t, self.h + self.kvh, self.hd).transpose(1, 2), cos, sin)
        q, k = qk.split([self.h, self.kvh], dim=1)
        v = v.view(b, t, self.kvh, self.hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if segments is not None:  # packed rows: causal within each sample, one SDPA call per sample
            gqa = self.kvh != self.h
            out = torch.cat([
                torch.cat([F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
                           for qs, ks, vs in zip(q[r : r + 1].split(n, 2), k[r : r + 1].split(n, 2), v[r : r + 1].split(n, 2))], dim=2)
                for r, n in enumerate(segments)
            ])
        elif t == 1 and self.kvh != self.h:
            # one new token: the h/kvh query heads that share a KV head are rows of one attention over it
            # (on the CPU in bf16, 6x faster than enable_gqa at the 15B's widths)
            g = self.h // self.kvh
            out = F.scaled_dot_product_attention(q.reshape(b, self.kvh, g, self.hd), k, v, attn_mask=mask)
            out = out.view(b, self.h, 1, self.hd)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and t > 1, enable_gqa=self.kvh != self.h
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.h * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, segments=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, segments)
        return x + self.mlp(self.post_attention_layernorm(x))


class LMHead(Linear):
    """The output projection. `head(h, apply=f)` returns `f(h, weight)` from inside the head's own
    forward: training's chunked loss uses the weight directly, and a wrapper that gathers the
    weight around the head's forward (an FSDP2 unit) then still gathers it for that use."""

    def forward(self, x: torch.Tensor, apply=None):
        return super().forward(x) if apply is None else apply(x, self.weight)


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.checkpointing = False  # activation checkpointing per layer (training)

    def forward(
        self,
        embeds: torch.Tensor,  # [B, T, D]
        positions: torch.Tensor,  # [B, T]
        mask: torch.Tensor | None = None,  # [B, 1, T, S] bool, S = cached + T
        cache: KVCache | None = None,
        segments: list[list[int]] | None = None,  # packed rows: each row's sample lengths (sum T), instead of a mask
    ) -> torch.Tensor:
        """Returns the final hidden states [B, T, D] (apply `lm_head` to the positions you need)."""
        cos, sin = rope_tables(self.cfg, positions, embeds.dtype)
        x = embeds
        for layer in self.layers:
            if self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, segments, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, segments)
        if cache is not None:
            cache.advance(embeds.shape[1])
        return self.norm(x)
