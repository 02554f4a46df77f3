"""Tests for iunet_nb.nn.orthogonal."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from iunet_nb.nn.orthogonal import METHODS, orthogonal_matrix, orthogonality_error, skew_symmetric

torch.set_num_threads(1)

SIZES = [1, 2, 3, 4, 8, 16, 33, 64]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", SIZES)
def test_orthogonal_and_special(method: str, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    W64 = torch.randn(n, n, dtype=torch.float64, generator=gen)
    Q32 = orthogonal_matrix(W64.float(), method)
    Q64 = orthogonal_matrix(W64, method)
    assert Q32.dtype == torch.float32 and Q64.dtype == torch.float64
    assert Q32.shape == (n, n)
    assert orthogonality_error(Q32) <= 1e-5
    assert orthogonality_error(Q64) <= 1e-12
    assert torch.linalg.det(Q64).item() == pytest.approx(1.0, abs=1e-10)
    assert torch.linalg.det(Q32.double()).item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", SIZES)
def test_identity_at_zero(method: str, n: int) -> None:
    for dtype in (torch.float32, torch.float64):
        Q = orthogonal_matrix(torch.zeros(n, n, dtype=dtype), method)
        torch.testing.assert_close(Q, torch.eye(n, dtype=dtype), rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_batched_matches_unbatched(method: str) -> None:
    W = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    Q = orthogonal_matrix(W, method)
    assert Q.shape == (2, 3, 5, 5)
    torch.testing.assert_close(Q[1, 2], orthogonal_matrix(W[1, 2], method))
    assert orthogonality_error(Q) <= 1e-12


def test_skew_symmetric() -> None:
    W = torch.randn(3, 4, 4)
    A = skew_symmetric(W)
    torch.testing.assert_close(A, -A.mT)
    torch.testing.assert_close(A, W - W.transpose(-1, -2))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(4, 4), (3, 5, 5)])
@pytest.mark.parametrize("at_zero", [True, False])
def test_gradcheck(method: str, shape: tuple[int, ...], at_zero: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    W = torch.zeros(shape, dtype=torch.float64) if at_zero else torch.randn(
        shape, dtype=torch.float64, generator=gen
    )
    W.requires_grad_(True)
    assert gradcheck(lambda w: orthogonal_matrix(w, method), (W,))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [2, 4, 8, 16, 33])
def test_float32_gradients_match_float64(method: str, n: int) -> None:
    gen = torch.Generator().manual_seed(100 + n)
    W = torch.randn(n, n, dtype=torch.float64, generator=gen)
    G = torch.randn(n, n, dtype=torch.float64, generator=gen)
    grads = []
    for dtype in (torch.float64, torch.float32):
        w = W.to(dtype).detach().clone().requires_grad_(True)
        (orthogonal_matrix(w, method) * G.to(dtype)).sum().backward()
        grads.append(w.grad.double())
    rel = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    assert rel <= 1e-4


@pytest.mark.parametrize("at_zero", [True, False])
def test_gradient_sign_cayley_matches_exp_at_identity(at_zero: bool) -> None:
    # At W = 0 cayley and exp agree to first order: dQ = 2 dA vs dQ = dA, i.e. same sign.
    G = torch.randn(4, 4, dtype=torch.float64)
    grads = {}
    for method in ("exp", "cayley"):
        w = torch.zeros(4, 4, dtype=torch.float64, requires_grad=True)
        (orthogonal_matrix(w, method) * G).sum().backward()
        grads[method] = w.grad
    torch.testing.assert_close(grads["cayley"], 2 * grads["exp"])


def test_exp_of_talk_theta_is_haar() -> None:
    theta = (math.pi / 4) * torch.tensor(
        [[0, 0, -1, -1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64
    )
    Q = orthogonal_matrix(theta, "exp")
    haar_rows = 0.5 * torch.tensor(
        [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64
    )
    torch.testing.assert_close(Q.abs(), torch.full((4, 4), 0.5, dtype=torch.float64))
    # every row of Q equals some Haar row up to sign, and all Haar rows are used
    match = (Q @ haar_rows.T).abs()  # |<q_i, h_j>| is 1 for a match, 0 otherwise
    torch.testing.assert_close(match.sum(0), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(match.sum(1), torch.ones(4, dtype=torch.float64))
    assert set(match.argmax(1).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("method", METHODS)
def test_autocast_and_half_give_float32(method: str) -> None:
    W = torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Q = orthogonal_matrix(W, method)
        Qb = orthogonal_matrix(W.bfloat16(), method)
    for q in (Q, Qb):
        assert q.dtype == torch.float32
        assert orthogonality_error(q) <= 1e-5
    Qh = orthogonal_matrix(W.half(), method)
    assert Qh.dtype == torch.float32 and orthogonality_error(Qh) <= 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Q64 = orthogonal_matrix(W.double(), method)
    assert Q64.dtype == torch.float64


def test_errors() -> None:
    with pytest.raises(ValueError, match="'exp', 'cayley', 'householder'"):
        orthogonal_matrix(torch.zeros(3, 3), "qr")
    with pytest.raises(ValueError, match="square"):
        orthogonal_matrix(torch.zeros(3, 4), "exp")
    with pytest.raises(ValueError, match="square"):
        orthogonal_matrix(torch.zeros(3), "cayley")
    with pytest.raises(ValueError, match="square"):
        orthogonality_error(torch.zeros(2, 3))
