"""bfloat16 autocast: the fused engine returns what conventional backprop returns, and its
gradients are as good as conventional bfloat16's (measured against float64)."""
from __future__ import annotations

import pytest
import torch

from iunet_nb import iUNet

torch.set_num_threads(1)


def _model(engine: str, dtype=torch.float32) -> iUNet:
    torch.manual_seed(0)
    kw = dict(disable_custom_gradient=True) if engine == "conventional" else dict(me_backend=engine)
    m = iUNet(channels=(8, 16, 32), architecture=(2, 2, 2), dim=2, verbose=0, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.to(dtype)


def _step(engine: str, x: torch.Tensor, g: torch.Tensor, autocast: bool):
    model = _model(engine, torch.float32 if autocast else torch.float64)
    xx = x.to(next(model.parameters()).dtype, copy=True).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(xx)
        loss = (y.float() * g.to(y.device)).sum() / y.numel() if autocast else (y * g.double()).sum() / y.numel()
    loss.backward()
    return y, [p.grad.double() for p in model.parameters()], xx.grad.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_fused_under_bf16_autocast_matches_conventional():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 32, 32, generator=gen)
    g = torch.randn(2, 8, 32, 32, generator=gen)
    y_conv, g_conv, dx_conv = _step("conventional", x, g, True)
    y_fused, g_fused, dx_fused = _step("fused", x, g, True)
    _, g_ref, dx_ref = _step("conventional", x, g, False)  # float64, no autocast
    assert y_fused.dtype == y_conv.dtype == torch.bfloat16
    # outputs agree to bfloat16 rounding (8 bits of mantissa: 2**-8 relative per element)
    assert _rel(y_fused.double(), y_conv.double()) < 2**-5
    err_conv = [_rel(a, r) for a, r in zip(g_conv, g_ref)]
    err_fused = [_rel(a, r) for a, r in zip(g_fused, g_ref)]
    diff = [_rel(a, b) for a, b in zip(g_fused, g_conv)]
    # conventional bfloat16 is itself off by bf16 rounding, accumulated over the layers ...
    assert 2**-12 < max(err_conv) < 0.25
    # ... and the fused engine (body in float32, exact inverse) is at least as close to float64
    assert max(err_fused) <= max(err_conv)
    # so the two differ by no more than conventional's own rounding error (per tensor)
    for d, e in zip(diff, err_conv):
        assert d <= 1.5 * e + 2**-8, (d, e)
    assert _rel(dx_fused, dx_ref) <= max(_rel(dx_conv, dx_ref), 2**-8)


def test_bf16_parameters_train_with_the_fused_engine():
    """Pure bfloat16 (``bench table1 --dtype bfloat16``): gradients exist and are finite."""
    model = _model("fused", torch.bfloat16)
    x = torch.randn(1, 8, 16, 16, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()
               for p in model.parameters())
