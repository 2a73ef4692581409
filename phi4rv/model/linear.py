"""`Linear`: `nn.Linear` whose fp32 product on CPU, with autograd off (inference), runs on oneDNN.

PyTorch sends fp32 CPU matmuls to MKL, and MKL does not use AVX-512 on AMD CPUs: on an EPYC
(bench/README.md, linear_backend.py) oneDNN ran a 2048^3 product at 2.2x MKL's GFLOP/s and the
products of decode and prefill 1.2-3.9x faster (one row: MKL's gemv used one thread). bf16
already goes to oneDNN. Training keeps `F.linear`, frozen parts included: the oneDNN op has no
backward, and a training run's result should not depend on which library multiplied. So does
anything under autocast (a bf16 run's evaluation), which the oneDNN op would bypass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@torch.library.custom_op("phi4rv::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same product as an op inductor calls as it is (it lowers the oneDNN op for frozen weights only)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if (
        _ONEDNN
        and x.dtype == weight.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()  # inference: training's products (frozen parts too) stay F.linear's
        and not torch.is_autocast_enabled("cpu")  # training's evaluation under bf16 autocast multiplies as training does
    ):
        if torch.compiler.is_compiling():
            return onednn_linear(x, weight, bias)
        if type(x) is torch.Tensor and type(weight) in (torch.Tensor, nn.Parameter):  # no DTensor or other subclass
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
