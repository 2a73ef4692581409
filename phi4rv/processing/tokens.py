"""The token layout that prompts, data and the model share: where an image goes and what carries no loss."""

from __future__ import annotations

Grid = tuple[int, int]  # an image's (h, w) in patches

IMAGE_TOKEN_ID = -200  # placeholder id in input_ids (LLaVA's convention); never embedded
IGNORE_INDEX = -100  # a target that carries no loss


def expand_image_tokens(ids: list[int], grids: list[Grid]) -> list[int]:
    """Repeat each image placeholder h*w times, images taken in order."""
    count = sum(1 for t in ids if t == IMAGE_TOKEN_ID)
    if count != len(grids):
        raise ValueError(f"prompt has {count} <image> tag(s) but {len(grids)} image(s) were given")
    out: list[int] = []
    images = iter(grids)
    for t in ids:
        if t == IMAGE_TOKEN_ID:
            h, w = next(images)
            out.extend([IMAGE_TOKEN_ID] * (h * w))
        else:
            out.append(t)
    return out
