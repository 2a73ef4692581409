"""Stage 0 for the vision encoder: SigLIP's sigmoid contrastive loss against a small text tower.

Each image in a batch is scored against each caption; matching pairs are pushed above zero and
every other pair below, independently (a sigmoid per pair, not a softmax over the batch):
`loss = -mean_i sum_j log sigmoid(z_ij * (t * <img_i, txt_j> + b))`, z = +1 on the diagonal, else -1.
The image side is our `VisionEncoder` (all layers + post_layernorm) with an attention-pooling
head; after training only the encoder's weights are kept, so the VLM starts from an encoder
whose patch features carry what the captions name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from phi4rv.config import VisionConfig
from phi4rv.model.vision import VisionEncoder
from phi4rv.processing.image import ImagePatches, ImageProcessorConfig, process_image


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+|\d", caption.lower())


class TextTower(nn.Module):
    """Word embeddings + positions -> a small bidirectional transformer -> mean -> projection."""

    def __init__(self, vocab: list[str], dim: int, out_dim: int, layers: int = 2, heads: int = 4, max_len: int = 32):
        super().__init__()
        self.vocab = {w: i + 1 for i, w in enumerate(vocab)}  # 0 = padding
        self.embed = nn.Embedding(len(vocab) + 1, dim, padding_idx=0)
        self.pos = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        rows = [[self.vocab[w] for w in words(c)] for c in captions]
        ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == 0  # [B, L]
        x = self.embed(ids) + self.pos.weight[: ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=pad))
        keep = (~pad).unsqueeze(-1).float()
        return self.proj((x * keep).sum(1) / keep.sum(1))  # [B, out_dim]


class AttentionPool(nn.Module):
    """SigLIP's MAP head: one learned query attends over an image's patches."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))

    def forward(self, feats: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        # feats: [N, D] packed -> [B, D]
        rows = nn.utils.rnn.pad_sequence(list(feats.split(lengths)), batch_first=True)  # [B, L, D]
        pad = torch.arange(rows.shape[1])[None] >= torch.tensor(lengths)[:, None]
        x = self.attn(self.probe.expand(len(lengths), -1, -1), rows, rows, key_padding_mask=pad, need_weights=False)[0]
        x = x[:, 0]
        return x + self.mlp(self.norm(x))


class SigLIP(nn.Module):
    def __init__(self, vision: VisionConfig, vocab: list[str], text_dim: int = 64):
        super().__init__()
        self.vision = VisionEncoder(vision)
        self.pool = AttentionPool(vision.hidden_size, vision.num_attention_heads)
        self.text = TextTower(vocab, text_dim, vision.hidden_size)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # SigLIP's initial t = 10, b = -10
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def embed_images(self, patches: list[ImagePatches]) -> torch.Tensor:
        grids = [p.grid for p in patches]
        lengths = [h * w for h, w in grids]
        v = self.vision
        x = v.embeddings(torch.cat([p.pixels for p in patches]), grids)
        for layer in v.encoder.layers:
            x = layer(x, lengths)
        return F.normalize(self.pool(v.post_layernorm(x), lengths), dim=-1)

    def embed_texts(self, captions: list[str]) -> torch.Tensor:
        return F.normalize(self.text(self.text.tokenize(captions)), dim=-1)

    def loss(self, patches: list[ImagePatches], captions: list[str]) -> torch.Tensor:
        logits = self.embed_images(patches) @ self.embed_texts(captions).T * self.logit_scale.exp() + self.logit_bias
        z = 2 * torch.eye(len(captions)) - 1
        return -F.logsigmoid(z * logits).sum(1).mean()


@dataclass
class ContrastiveConfig:
    steps: int = 600
    batch: int = 128
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.05
    seed: int = 0


@torch.no_grad()
def retrieval_accuracy(model: SigLIP, patches: list[ImagePatches], captions: list[str]) -> float:
    """Share of images whose best-scoring caption among `captions` is their own (distinct captions)."""
    model.eval()
    sims = model.embed_images(patches) @ model.embed_texts(captions).T
    same = torch.tensor([[a == b for b in captions] for a in captions])
    model.train()
    return same[torch.arange(len(captions)), sims.argmax(1)].float().mean().item()


def pretrain_vision(vision: VisionConfig, pairs: list[tuple[bytes, str]], heldout: list[tuple[bytes, str]],
                    image_cfg: ImageProcessorConfig, cfg: ContrastiveConfig, progress: bool = True) -> tuple[dict, dict]:
    """Train a SigLIP pair on (PNG, caption) pairs; returns the vision encoder's state dict and a
    summary (loss curve, held-out retrieval accuracy before and after)."""
    torch.manual_seed(cfg.seed)
    vocab = sorted({w for _, c in pairs + heldout for w in words(c)})
    model = SigLIP(vision, vocab)
    patches = [process_image(png, image_cfg) for png, _ in pairs]
    captions = [c for _, c in pairs]
    test_patches = [process_image(png, image_cfg) for png, _ in heldout]
    test_captions = [c for _, c in heldout]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "probe" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "probe" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    gen = torch.Generator().manual_seed(cfg.seed)
    before = retrieval_accuracy(model, test_patches, test_captions)
    curve = []
    bar = tqdm(range(cfg.steps), desc="vision (sigmoid contrastive)", unit="step", disable=not progress)
    for step in bar:
        idx = torch.randint(len(pairs), (cfg.batch,), generator=gen).tolist()
        loss = model.loss([patches[i] for i in idx], [captions[i] for i in idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    after = retrieval_accuracy(model, test_patches, test_captions)
    state = {k: v.detach().clone() for k, v in model.vision.state_dict().items()}
    return state, {"loss": curve, "retrieval_before": before, "retrieval_after": after, "heldout": len(heldout)}
