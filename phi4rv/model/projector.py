"""`mlp2x_gelu`: Linear -> GELU (exact) -> Linear, from vision width to decoder width."""

from torch import nn

from phi4rv.config import ProjectorConfig


def build_projector(cfg: ProjectorConfig) -> nn.Sequential:
    # nn.Sequential keeps the release's weight names: mm_projector.0 and mm_projector.2
    return nn.Sequential(
        nn.Linear(cfg.input_size, cfg.output_size),
        nn.GELU(),
        nn.Linear(cfg.output_size, cfg.output_size),
    )
