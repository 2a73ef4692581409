"""`model.linear`: fp32 CPU inference products (oneDNN) against float64; training keeps autograd."""

import pytest
import torch
import torch.nn.functional as F

from phi4rv.model.linear import Linear


@pytest.mark.parametrize("shape", [(1, 96), (3, 5, 96), (17, 96), (0, 96)])
def test_inference_product_matches_float64(shape):
    torch.manual_seed(0)
    m = Linear(96, 300)
    x = torch.randn(*shape)
    with torch.no_grad():
        got = m(x)
    ref = x.double() @ m.weight.double().t() + m.bias.double()
    assert got.shape == (*shape[:-1], 300) and got.dtype == torch.float32
    if got.numel():
        assert (got.double() - ref).abs().max().item() < 1e-5


def test_training_keeps_autograd():
    torch.manual_seed(1)
    m = Linear(32, 8)
    x = torch.randn(4, 32, requires_grad=True)
    m(x).square().sum().backward()
    gx, gw = x.grad.clone(), m.weight.grad.clone()
    x.grad = None
    m.weight.grad = None
    F.linear(x, m.weight, m.bias).square().sum().backward()
    assert torch.equal(gx, x.grad) and torch.equal(gw, m.weight.grad)


def test_frozen_layers_in_training_keep_f_linear():
    """A training run must not depend on the backend: frozen parts (a frozen vision tower) take F.linear too."""
    torch.manual_seed(2)
    m = Linear(256, 512).requires_grad_(False)
    x = torch.randn(64, 256)
    assert torch.equal(m(x), F.linear(x, m.weight, m.bias))


def test_autocast_is_respected():
    """Evaluation during a bf16 training run (autocast, no grad) multiplies in bf16, as the training steps do."""
    torch.manual_seed(3)
    m = Linear(64, 32)
    x = torch.randn(5, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = m(x), F.linear(x, m.weight, m.bias)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
