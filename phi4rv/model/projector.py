"""`mlp2x_gelu`: Linear -> GELU (exact) -> Linear, from vision width to decoder width."""

from torch import nn

from phi4rv.model.linear import Linear


def build_projector(vision_size: int, decoder_size: int) -> nn.Sequential:
    # nn.Sequential keeps the release's weight names: mm_projector.0 and mm_projector.2
    return nn.Sequential(
        Linear(vision_size, decoder_size),
        nn.GELU(),
        Linear(decoder_size, decoder_size),
    )
