"""Forward + backward (+ inverse) of every layer, for a strict-warnings interpreter.

Run by tests/test_warnings.py as

    python -W error::FutureWarning -W error::DeprecationWarning tests/warnings_smoke.py

so any FutureWarning or DeprecationWarning raised by our code, torch or memcnn
on these paths becomes an exception and a non-zero exit.  Prints one line per
check and exits 0 on success.
"""

from __future__ import annotations

import sys

import torch

import iunet_nb
from iunet_nb import (
    InvertibleDownsampling,
    InvertibleUpsampling,
    OrthogonalChannelMixing,
    create_memcnn_module,
    create_standard_module,
    iUNet,
    orthogonal_matrix,
)


def check_close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    err = (a - b).abs().max().item()
    if not err < tol:
        raise AssertionError(f"{what}: inverse error {err:.3g} >= {tol}")


def check_grads(params, what: str) -> None:
    params = list(params)
    if not params or any(p.grad is None or not torch.isfinite(p.grad).all() for p in params):
        raise AssertionError(f"{what}: missing or non-finite parameter gradients")


def perturb_(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def orthogonal() -> None:
    for method in iunet_nb.METHODS:
        W = (0.1 * torch.randn(3, 5, 5)).requires_grad_()
        Q = orthogonal_matrix(W, method)
        (Q * torch.randn(3, 5, 5)).sum().backward()
        assert W.grad is not None and torch.isfinite(W.grad).all(), method
        print(f"ok orthogonal_matrix method={method}")


def resampling() -> None:
    for dim in (1, 2, 3):
        down = InvertibleDownsampling(3, stride=2, dim=dim)
        up = InvertibleUpsampling(3 * 2 ** dim, stride=2, dim=dim)
        perturb_(down)
        perturb_(up)
        x = torch.randn(2, 3, *([4] * dim), requires_grad=True)
        y = down(x)
        check_close(down.inverse(y), x.detach(), f"InvertibleDownsampling dim={dim}")
        z = up(y)
        check_close(up.inverse(z), y.detach(), f"InvertibleUpsampling dim={dim}")
        z.square().sum().backward()
        check_grads([*down.parameters(), *up.parameters(), x], f"resampling dim={dim}")
        print(f"ok InvertibleDownsampling/InvertibleUpsampling dim={dim}")


def mixing() -> None:
    for dim in (1, 2, 3):
        mix = OrthogonalChannelMixing(5, dim=dim)
        perturb_(mix)
        x = torch.randn(2, 5, *([3] * dim), requires_grad=True)
        y = mix(x)
        check_close(mix.inverse(y), x.detach(), f"OrthogonalChannelMixing dim={dim}")
        y.square().sum().backward()
        check_grads([*mix.parameters(), x], f"OrthogonalChannelMixing dim={dim}")
    print("ok OrthogonalChannelMixing")


def couplings() -> None:
    for name, make in (("standard", create_standard_module), ("memcnn", create_memcnn_module)):
        for dim in (1, 2, 3):
            block = make(7, dim=dim, depth=2)
            perturb_(block)
            x = torch.randn(2, 7, *([4] * dim), requires_grad=True)
            y = block(x)
            check_close(block.inverse(y.detach()), x.detach(), f"{name} coupling dim={dim}")
            y.square().sum().backward()
            check_grads([*block.parameters(), x], f"{name} coupling dim={dim}")
        print(f"ok {name} coupling")


def models() -> None:
    engines = {
        "fused": dict(me_backend="fused"),
        "memcnn": dict(me_backend="memcnn"),
        "conventional": dict(disable_custom_gradient=True),
    }
    for name, kwargs in engines.items():
        for dim, channels, size in ((1, (3, 4, 6), (11,)), (2, (3, 8, 16), (9, 10)), (3, (3, 16), (3, 5, 4))):
            model = iUNet(channels=channels, architecture=(2,) * len(channels), dim=dim,
                          verbose=0, **kwargs)
            perturb_(model)
            x = torch.randn(2, 3, *size, requires_grad=True)
            x_copy = x.detach().clone()
            y = model(x)
            y.square().sum().backward()
            check_grads([*model.parameters(), x], f"iUNet {name} dim={dim}")
            assert torch.equal(x.detach(), x_copy), f"iUNet {name} dim={dim} modified its input"
            with torch.no_grad():
                check_close(model.inverse(y), x_copy, f"iUNet {name} dim={dim}")
        print(f"ok iUNet engine={name}")


def main() -> int:
    torch.manual_seed(0)
    orthogonal()
    resampling()
    mixing()
    couplings()
    models()
    print("warnings smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
