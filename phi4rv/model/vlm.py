"""Mid-fusion: image features replace the `<image>` placeholder positions of the text.

Each `<image>` placeholder id in the prompt is expanded to `h*w` placeholder positions
(`expand_image_tokens`); the model fills them, in order, with the projected patch features.
No begin/end tokens and no row separators, as in the release.
"""

from __future__ import annotations

import torch
from torch import nn

from phi4rv.config import Phi4RVConfig
from phi4rv.model.decoder import Decoder, KVCache, RMSNorm
from phi4rv.model.projector import build_projector
from phi4rv.model.vision import Grid, VisionEncoder
from phi4rv.processing.tokens import IMAGE_TOKEN_ID


def attention_mask(
    key_valid: torch.Tensor,  # [B, S] bool: real (not padding) positions
    q_len: int,
    image_ids: torch.Tensor | None = None,  # [B, S] long: k>0 for positions of image k, else 0
    segment_ids: torch.Tensor | None = None,  # [B, S] long: packed sample id per position
) -> torch.Tensor:
    """Causal mask [B, 1, q_len, S] for the last `q_len` positions, optionally bidirectional within images.

    With `segment_ids` (packed rows) a position attends only within its own sample: block-causal.
    Every query may attend to itself, so padding rows never softmax over an empty set (NaN).
    """
    s = key_valid.shape[1]
    q_pos = torch.arange(s - q_len, s, device=key_valid.device)
    k_pos = torch.arange(s, device=key_valid.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & key_valid[:, None, :]  # [B, T, S]
    if image_ids is not None:
        q_img = image_ids[:, s - q_len :]
        allowed |= (q_img[:, :, None] == image_ids[:, None, :]) & (q_img[:, :, None] > 0) & key_valid[:, None, :]
    if segment_ids is not None:
        allowed &= segment_ids[:, s - q_len :, None] == segment_ids[:, None, :]
    allowed |= (k_pos[None, :] == q_pos[:, None])[None]
    return allowed[:, None]


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, 2, ... restarting at each new segment id along a row (packed samples)."""
    b, t = segment_ids.shape
    idx = torch.arange(t, device=segment_ids.device).expand(b, -1)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - start_idx


def image_segment_ids(input_ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Number each image's positions 1, 2, ... in the order images appear (row-major over the batch)."""
    is_image = (input_ids == IMAGE_TOKEN_ID).flatten()
    ids = torch.zeros_like(input_ids).flatten()
    ids[is_image] = torch.repeat_interleave(
        torch.arange(1, len(lengths) + 1, device=input_ids.device), torch.tensor(lengths, device=input_ids.device)
    )
    return ids.view_as(input_ids)


class Phi4RV(nn.Module):
    def __init__(self, cfg: Phi4RVConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.projector = build_projector(cfg.vision.hidden_size, cfg.decoder.hidden_size)
        self.decoder = Decoder(cfg.decoder)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init for new models: normal(0, std) matrices and embeddings, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    def encode_images(self, pixels: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        """[N, C*p*p] packed patches -> [N, D_lm] features ready to splice into the text."""
        return self.projector(self.vision(pixels, grids))

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """[B, T] ids (image positions = IMAGE_TOKEN_ID) -> [B, T, D] embeddings with images spliced in."""
        is_image = input_ids == IMAGE_TOKEN_ID
        x = self.decoder.embed_tokens(input_ids.clamp(min=0))
        n_feat = 0 if image_features is None else image_features.shape[0]
        n_pos = int(is_image.sum())
        if n_pos != n_feat:
            raise ValueError(f"{n_pos} image positions in the input but {n_feat} image features")
        if n_feat:
            x = x.masked_scatter(is_image[..., None], image_features.to(x.dtype))
        return x

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T], images already expanded (expand_image_tokens)
        pixels: torch.Tensor | None = None,  # [N, C*p*p] all images of the batch, packed in order
        grids: list[Grid] | None = None,
        padding_mask: torch.Tensor | None = None,  # [B, T] bool, True = real token (left-padded rows)
        positions: torch.Tensor | None = None,  # [B, T]
        segment_ids: torch.Tensor | None = None,  # [B, T] packed rows: sample id per position, 0 = padding
        logits_at: torch.Tensor | None = None,  # [B, T] bool: only these positions' logits, as [N, V]
        always_run_vision: bool = False,  # no images: run the vision tower on a blank patch, times 0
        hidden_only: bool = False,  # return the final hidden states, not logits (the caller applies lm_head)
    ) -> torch.Tensor:
        """Logits [B, T, V] ([N, V] with `logits_at`; final hidden states with `hidden_only`).

        With `segment_ids`, several samples share a row: attention is block-causal (no sample sees
        another) and default positions restart at 0 for each sample. `logits_at` skips the LM head
        where no loss is taken (image and prompt positions are most of a VLM's sequence). The loss
        lives with training (`phi4rv.train.loss`).
        """
        if segment_ids is not None and padding_mask is not None:
            raise ValueError("give padding_mask (padded rows) or segment_ids (packed rows), not both")
        grids = grids or []
        feats = self.encode_images(pixels, grids) if grids else None
        blank = None
        if always_run_vision and not grids:
            # sharded training: every process runs the same layers in the same order whatever its
            # data (see train.loss), so the blank patch goes through the tower where images would
            blank = self.encode_images(torch.zeros(1, self.cfg.vision.patch_dim, device=input_ids.device), [(1, 1)])
        x = self.embed(input_ids, feats)
        if blank is not None:
            x = x + blank.sum().to(x.dtype) * 0.0
        valid = padding_mask
        if segment_ids is not None:
            valid = segment_ids > 0
            if positions is None:
                positions = segment_positions(segment_ids)
        if positions is None:
            positions = default_positions(padding_mask, input_ids)
        mask = segments = None
        if self.cfg.image_bidirectional_attention and grids:
            valid = valid if valid is not None else torch.ones_like(input_ids, dtype=torch.bool)
            image_ids = image_segment_ids(input_ids, [h * w for h, w in grids])
            mask = attention_mask(valid, input_ids.shape[1], image_ids, segment_ids)
        elif segment_ids is not None:
            # no [T, T] mask: attention runs per sample (trailing padding is a segment of its own)
            segments = [torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in segment_ids]
        elif padding_mask is not None and not bool(padding_mask.all()):
            mask = attention_mask(padding_mask, input_ids.shape[1])
        h = self.decoder(x, positions, mask, segments=segments)
        if logits_at is not None:
            h = h[logits_at]
        if hidden_only:
            return h
        return self.decoder.lm_head(h)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.cfg.decoder, batch, max_len, self.device, self.dtype)


def default_positions(padding_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... counted over real tokens only (left padding does not shift positions)."""
    if padding_mask is None:
        b, t = input_ids.shape
        return torch.arange(t, device=input_ids.device).expand(b, -1)
    return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)
