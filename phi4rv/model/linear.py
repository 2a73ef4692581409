"""`Linear`: `nn.Linear` whose fp32 product on CPU, outside autograd, runs on oneDNN.

PyTorch sends fp32 CPU matmuls to MKL, and MKL does not use AVX-512 on AMD CPUs: on an EPYC
(bench/README.md, "fp32 linears on oneDNN") oneDNN ran a 2048^3 product at 2.2x MKL's GFLOP/s and
decode's 1-16 rows against a 768 x 100352 head 2.4-4.5x faster (one row: MKL's gemv uses one
thread). bf16 already goes to oneDNN. Training (autograd) and `torch.compile` keep `F.linear`:
the oneDNN op has no backward, and inductor lowers it only for frozen weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if (
        _ONEDNN
        and x.dtype == weight.dtype == torch.float32
        and x.device.type == "cpu"
        and type(x) is torch.Tensor  # not a DTensor or another subclass
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
