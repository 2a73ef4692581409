"""SigLIP-2 NaFlex vision encoder over a packed sequence of images.

Images of different sizes are concatenated into one sequence of patches `[N, C*p*p]`; the
linear layers and MLPs run on all of it at once, attention runs per image. Nothing is padded to
`max_num_patches`. Module and parameter names follow transformers' `Siglip2VisionModel` so the
release's weight names map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from phi4rv.config import VisionConfig
from phi4rv.model.linear import Linear

Grid = tuple[int, int]


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.grid = cfg.position_grid
        self.patch_embedding = Linear(cfg.patch_dim, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def positions(self, grids: list[Grid]) -> torch.Tensor:
        """The learned square position grid resized to each image's (h, w), concatenated: [N, D]."""
        table = self.position_embedding.weight
        square = table.reshape(self.grid, self.grid, -1).permute(2, 0, 1)[None].float()  # [1, D, g, g]
        out, cache = [], {}
        for h, w in grids:
            if (h, w) not in cache:
                resized = F.interpolate(square, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
                cache[h, w] = resized[0].reshape(table.shape[1], h * w).T.to(table.dtype)
            out.append(cache[h, w])
        return torch.cat(out)

    def forward(self, pixels: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        # pixels: [N, C*p*p] -> [N, D]
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        return x + self.positions(grids)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj = Linear(d, d)
        self.k_proj = Linear(d, d)
        self.v_proj = Linear(d, d)
        self.out_proj = Linear(d, d)

    def forward(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        # x: [N, D], one block of `lengths[i]` patches per image; bidirectional within a block.
        n, d = x.shape
        hd = d // self.num_heads
        # [1, H, N, hd]: 4-D inputs let SDPA use its fused (flash) CPU kernel; with 3-D inputs it
        # falls back to the math path, which materialises every [H, n, n] score matrix.
        q, k, v = (p(x).view(1, n, self.num_heads, hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if len(lengths) == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(qi, ki, vi)
                    for qi, ki, vi in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))
                ],
                dim=2,
            )
        return self.out_proj(out[0].transpose(0, 1).reshape(n, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), lengths)
        return x + self.mlp(self.layer_norm2(x))


class VisionLayers(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionEncoder(nn.Module):
    """Returns one feature per patch from the second-to-last layer (the VLM's `hidden_states[-2]`).

    The last layer, `post_layernorm` and the pooling head are not used by the VLM; the last layer
    and `post_layernorm` are kept so the release's weights load without unexpected keys.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionLayers(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        # pixels: [N, C*p*p] with N = sum(h*w) -> features [N, D]
        lengths = [h * w for h, w in grids]
        if sum(lengths) != pixels.shape[0]:
            raise ValueError(f"grids cover {sum(lengths)} patches but {pixels.shape[0]} were given")
        x = self.embeddings(pixels, grids)
        for layer in self.encoder.layers[:-1]:
            x = layer(x, lengths)
        return x
