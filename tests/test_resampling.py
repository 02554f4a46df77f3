"""Tests for iunet_nb.nn.resampling (learnable invertible down/upsampling)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.func import functional_call

from iunet_nb.nn.orthogonal import METHODS, orthogonal_matrix, orthogonality_error
from iunet_nb.nn.resampling import (
    INITS,
    InvertibleDownsampling,
    InvertibleUpsampling,
    haar_matrix,
)

torch.set_num_threads(1)

# (dim, stride): isotropic, anisotropic and non-power-of-two strides
STRIDE_CASES = [
    (1, 2),
    (1, 3),
    (2, 2),
    (2, (2, 1)),
    (2, 3),
    (2, (3, 2)),
    (3, 2),
    (3, (1, 2, 2)),
]
# (method, learnable); the method is irrelevant for a fixed kernel
METHOD_CASES = [(m, True) for m in METHODS] + [("cayley", False)]
C = 2


def _stride_tuple(dim: int, stride: int | tuple[int, ...]) -> tuple[int, ...]:
    return (stride,) * dim if isinstance(stride, int) else stride


def _fine_input(dim: int, stride, dtype: torch.dtype, blocks: int = 3, n: int = 2) -> torch.Tensor:
    st = _stride_tuple(dim, stride)
    blocks = 2 if dim == 3 else blocks
    return torch.randn(n, C, *(s * blocks for s in st), dtype=dtype)


def _perturb(module: torch.nn.Module, scale: float = 0.5) -> None:
    if module.weight is not None:
        with torch.no_grad():
            module.weight.copy_(scale * torch.randn_like(module.weight))


def _cases():
    for dim, stride in STRIDE_CASES:
        for init in INITS:
            for method, learnable in METHOD_CASES:
                yield pytest.param(
                    dim, stride, init, method, learnable,
                    id=f"d{dim}-s{stride}-{init}-{method if learnable else 'fixed'}",
                )


@pytest.mark.parametrize("dim,stride,init,method,learnable", list(_cases()))
def test_round_trip(dim, stride, init, method, learnable) -> None:
    torch.manual_seed(0)
    s = math.prod(_stride_tuple(dim, stride))
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        down = InvertibleDownsampling(
            C, stride, dim=dim, method=method, init=init, learnable=learnable, dtype=dtype
        )
        up = InvertibleUpsampling(
            C * s, stride, dim=dim, method=method, init=init, learnable=learnable, dtype=dtype
        )
        _perturb(down)
        _perturb(up)
        assert orthogonality_error(down.kernel()) <= tol
        x = _fine_input(dim, stride, dtype)
        y = down(x)
        st = _stride_tuple(dim, stride)
        assert y.shape == (x.shape[0], C * s, *(n // k for n, k in zip(x.shape[2:], st)))
        assert y.dtype == dtype
        assert (down.inverse(y) - x).abs().max().item() <= tol
        # orthogonal operator: preserves the norm
        assert abs(y.norm().item() - x.norm().item()) <= tol * x.norm().item()
        # upsampling module: forward and inverse in both orders
        assert (up(up.inverse(x)) - x).abs().max().item() <= tol
        yc = torch.randn_like(y)
        xf = up(yc)
        assert xf.shape == x.shape
        assert (up.inverse(xf) - yc).abs().max().item() <= tol


@pytest.mark.parametrize("dim,stride", STRIDE_CASES)
@pytest.mark.parametrize("init", INITS)
def test_upsampling_with_same_init_inverts_downsampling(dim, stride, init) -> None:
    s = math.prod(_stride_tuple(dim, stride))
    torch.manual_seed(3)
    down = InvertibleDownsampling(C, stride, dim=dim, init=init, dtype=torch.float64)
    torch.manual_seed(3)  # same random init
    up = InvertibleUpsampling(C * s, stride, dim=dim, init=init, dtype=torch.float64)
    x = _fine_input(dim, stride, torch.float64)
    assert (up(down(x)) - x).abs().max().item() <= 1e-12
    y = torch.randn_like(down(x))
    assert (down(up(y)) - y).abs().max().item() <= 1e-12


def test_identity_kernel_is_pixel_unshuffle() -> None:
    x = torch.randn(2, 3, 8, 12)
    for learnable in (False, True):
        for method in METHODS:
            down = InvertibleDownsampling(3, 2, dim=2, init="pixel_shuffle", method=method,
                                          learnable=learnable)
            assert torch.equal(down(x), F.pixel_unshuffle(x, 2))
            assert torch.equal(down.inverse(F.pixel_unshuffle(x, 2)), x)
    down3 = InvertibleDownsampling(3, 3, dim=2, init="pixel_shuffle", learnable=False)
    x3 = torch.randn(2, 3, 9, 6)
    assert torch.equal(down3(x3), F.pixel_unshuffle(x3, 3))


def test_haar_subbands() -> None:
    """Haar init reproduces independently computed 2D Haar sub-bands.

    Channel order for a stride-2 block [[a, b], [c, d]] (row-major offsets 0..3):
    0: (a+b+c+d)/2 (average), 1: (a-b+c-d)/2 (difference along the last axis),
    2: (a+b-c-d)/2 (difference along the first axis), 3: (a-b-c+d)/2 (diagonal).
    """
    img = torch.randn(10, 14, dtype=torch.float64)
    a, b = img[::2, ::2], img[::2, 1::2]
    c, d = img[1::2, ::2], img[1::2, 1::2]
    expected = torch.stack(
        [(a + b + c + d) / 2, (a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2]
    )
    down = InvertibleDownsampling(1, 2, dim=2, init="haar", dtype=torch.float64)
    out = down(img[None, None])[0]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)


def test_haar_matrix() -> None:
    h = haar_matrix(2)
    torch.testing.assert_close(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
                               / math.sqrt(2))
    assert haar_matrix((2, 2)).shape == (4, 4)
    assert haar_matrix((1, 2, 2)).shape == (4, 4)
    torch.testing.assert_close(haar_matrix((1, 2, 2)), haar_matrix((2, 2)))
    assert torch.equal(haar_matrix((1, 1)), torch.ones(1, 1, dtype=torch.float64))
    assert orthogonality_error(haar_matrix((2, 2, 2))) <= 1e-15


def _classic_haar(stride: tuple[int, ...]) -> torch.Tensor:
    """Kronecker product of [[1, 1], [1, -1]] / sqrt(2) (stride 2) and [[1]] (stride 1)."""
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2.0)
    out = torch.ones(1, 1, dtype=torch.float64)
    for s in stride:
        out = torch.kron(out, h2 if s == 2 else torch.ones(1, 1, dtype=torch.float64))
    return out


@pytest.mark.parametrize("stride", [2, (2, 2), (1, 2), (2, 1, 2), (2, 2, 2)])
def test_haar_for_strides_1_and_2_is_exactly_the_classic_haar(stride) -> None:
    st = (stride,) if isinstance(stride, int) else stride
    assert torch.equal(haar_matrix(st), _classic_haar(st))


@pytest.mark.parametrize("stride", [(3,), (4,), (5,), (7,), (3, 2), (2, 3), (5, 1, 2), (1, 2, 3),
                                    (3, 3, 3), (4, 4)])
def test_haar_generalisation_is_orthogonal_with_the_mean_first(stride) -> None:
    H = haar_matrix(stride)
    s = math.prod(stride)
    assert H.shape == (s, s)
    assert orthogonality_error(H) <= 1e-14
    # row 0 is the local mean (scaled to unit norm), every other row a zero-sum detail filter
    torch.testing.assert_close(H[0], torch.full((s,), 1 / math.sqrt(s), dtype=torch.float64),
                               rtol=0, atol=1e-15)
    assert H[1:].sum(dim=1).abs().max() <= 1e-13
    # per dimension the orthonormal DCT-II (scipy as an independent reference), Kronecker product
    # over dims in row-major block order
    import scipy.fft

    ref = torch.ones(1, 1, dtype=torch.float64)
    for n in stride:
        ref = torch.kron(ref, torch.from_numpy(scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0)))
    torch.testing.assert_close(H, ref, rtol=0, atol=1e-14)


def test_haar_downsampling_first_channel_is_the_block_mean_for_stride_3() -> None:
    x = torch.randn(2, 2, 9, 6, dtype=torch.float64)
    down = InvertibleDownsampling(2, (3, 2), dim=2, init="haar", dtype=torch.float64)
    y = down(x)
    mean = F.avg_pool2d(x, (3, 2))
    torch.testing.assert_close(y[:, ::6], mean * math.sqrt(6), rtol=0, atol=1e-13)
    torch.testing.assert_close(down.inverse(y), x, rtol=0, atol=1e-13)


def test_squeeze_is_an_alias_of_pixel_shuffle() -> None:
    x = torch.randn(1, 3, 8, 6)
    down = InvertibleDownsampling(3, 2, dim=2, init="squeeze")
    assert down.init == "pixel_shuffle"
    assert torch.equal(down(x), F.pixel_unshuffle(x, 2))
    assert torch.equal(down.base, InvertibleDownsampling(3, 2, dim=2, init="pixel_shuffle").base)


@pytest.mark.parametrize("kind", ["tensor", "ndarray", "float32", "per_channel"])
def test_user_given_orthogonal_matrix(kind) -> None:
    torch.manual_seed(3)
    s = 6
    Q = torch.linalg.qr(torch.randn(s, s, dtype=torch.float64))[0]
    if kind == "ndarray":
        init = Q.numpy()
    elif kind == "float32":
        init = Q.float()  # orthogonal to ~1e-7 only: accepted and polished
    elif kind == "per_channel":
        Q = torch.linalg.qr(torch.randn(C, s, s, dtype=torch.float64))[0]
        init = Q
    else:
        init = Q
    down = InvertibleDownsampling(C, (3, 2), dim=2, init=init, dtype=torch.float64)
    up = InvertibleUpsampling(C * s, (3, 2), dim=2, init=init, dtype=torch.float64)
    assert down.init == "matrix"
    assert orthogonality_error(down.base) <= 1e-15
    torch.testing.assert_close(down.base, Q.expand(C, s, s), rtol=0, atol=1e-6)
    x = torch.randn(2, C, 6, 4, dtype=torch.float64)
    # y[:, c*s + r] = sum_k Q[c, r, k] x_block[c, k]
    from iunet_nb.nn.resampling import to_blocks

    expected = (Q.expand(C, s, s) @ to_blocks(x, (3, 2))).reshape(2, C * s, 2, 2)
    torch.testing.assert_close(down(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(up(down(x)), x, rtol=0, atol=1e-13)
    if kind == "tensor":  # the caller's matrix is not changed
        assert torch.equal(init, Q)


def test_user_given_matrix_errors() -> None:
    with pytest.raises(ValueError, match=r"must have shape \(4, 4\) or \(2, 4, 4\).*got shape \(3, 3\)"):
        InvertibleDownsampling(2, 2, dim=2, init=torch.eye(3))
    with pytest.raises(ValueError, match=r"shape \(4, 4\).*got shape \(3, 4, 4\)"):
        InvertibleDownsampling(2, 2, dim=2, init=torch.eye(4).expand(3, 4, 4))
    with pytest.raises(ValueError, match=r"not orthogonal: max \|M\^T M - I\| = 3 > 1e-05"):
        InvertibleDownsampling(2, 2, dim=2, init=2 * np.eye(4))
    with pytest.raises(ValueError, match="NaN or infinite"):
        InvertibleDownsampling(2, 2, dim=2, init=torch.full((4, 4), float("nan")))
    with pytest.raises(ValueError, match="must be real"):
        InvertibleDownsampling(2, 2, dim=2, init=np.eye(4, dtype=complex))
    with pytest.raises(ValueError, match="'squeeze', or an orthogonal"):
        InvertibleDownsampling(2, 2, dim=2, init=[[1, 0], [0, 1]])
    # a permutation (det -1) is orthogonal: fine as a fixed base
    InvertibleDownsampling(1, 2, dim=1, init=torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


@pytest.mark.parametrize("dim,stride", STRIDE_CASES)
@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_input_and_parameter(dim, stride, method) -> None:
    torch.manual_seed(1)
    s = math.prod(_stride_tuple(dim, stride))
    init = "haar"
    for cls, channels, fine in ((InvertibleDownsampling, 2, True), (InvertibleUpsampling, 2 * s, False)):
        module = cls(channels, stride, dim=dim, method=method, init=init, dtype=torch.float64)
        x = _fine_input(dim, stride, torch.float64, blocks=1, n=1)
        if not fine:
            x = torch.randn_like(module.inverse(x))
        x.requires_grad_(True)
        W = (0.3 * torch.randn_like(module.weight)).requires_grad_(True)

        def f(inp, w, module=module):
            return functional_call(module, {"weight": w}, (inp,))

        assert gradcheck(f, (x, W))


def test_gradcheck_shared_and_inverse() -> None:
    torch.manual_seed(2)
    down = InvertibleDownsampling(3, (2, 2), dim=2, method="exp", init="random", shared=True,
                                  dtype=torch.float64)
    assert down.weight.shape == (1, 4, 4) and down.kernel().shape == (1, 4, 4)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 12, 2, 2, dtype=torch.float64, requires_grad=True)
    W = (0.3 * torch.randn(1, 4, 4, dtype=torch.float64)).requires_grad_(True)
    assert gradcheck(lambda i, w: functional_call(down, {"weight": w}, (i,)), (x, W))
    # inverse with a precomputed kernel: gradients reach the parameter through it
    assert gradcheck(
        lambda i, w: down.inverse(i, kernel=down.base @ orthogonal_matrix(w, "exp")), (y, W)
    )


def test_shared_kernel_applies_to_all_channels() -> None:
    down = InvertibleDownsampling(3, 2, dim=1, init="random", shared=True)
    _perturb(down)
    x = torch.randn(2, 3, 8)
    y = down(x)
    # each channel transformed by the same matrix
    for c in range(3):
        single = InvertibleDownsampling(1, 2, dim=1, init="pixel_shuffle", learnable=False)
        torch.testing.assert_close(y[:, 2 * c:2 * c + 2], single(x[:, c:c + 1], kernel=down.kernel()))
    assert (down.inverse(y) - x).abs().max() <= 1e-5


def test_kernel_computed_once_per_call(monkeypatch) -> None:
    for cls, channels in ((InvertibleDownsampling, 2), (InvertibleUpsampling, 8)):
        module = cls(channels, 2, dim=2)
        calls = []
        original = type(module).kernel

        def counting(self, original=original):
            calls.append(1)
            return original(self)

        monkeypatch.setattr(type(module), "kernel", counting)
        x = torch.randn(1, channels, 4, 4)
        y = module(x)
        assert len(calls) == 1
        module.inverse(y)
        assert len(calls) == 2
        k = module.kernel()
        assert len(calls) == 3
        y2 = module(x, kernel=k)
        module.inverse(y2, kernel=k)
        assert len(calls) == 3
        torch.testing.assert_close(y2, y)
        monkeypatch.undo()


def test_precomputed_kernel_used_as_is() -> None:
    down = InvertibleDownsampling(2, 2, dim=2, init="haar")
    x = torch.randn(1, 2, 4, 4)
    eye = torch.eye(4).expand(2, 4, 4)
    assert torch.equal(down(x, kernel=eye), F.pixel_unshuffle(x, 2))
    with pytest.raises(ValueError, match="kernel must have shape"):
        down(x, kernel=torch.eye(3).expand(2, 3, 3))


def test_kernel_gradients_flow_and_fixed_kernel() -> None:
    down = InvertibleDownsampling(2, 2, dim=2, method="householder")
    down(torch.randn(1, 2, 4, 4)).square().mul(torch.randn(1, 8, 2, 2)).sum().backward()
    assert down.weight.grad is not None and down.weight.grad.abs().sum() > 0
    fixed = InvertibleDownsampling(2, 2, dim=2, learnable=False)
    assert fixed.weight is None and list(fixed.parameters()) == []
    assert fixed.kernel() is fixed.base


def test_kernel_starts_at_init_for_every_method() -> None:
    for method in METHODS:
        torch.manual_seed(5)
        down = InvertibleDownsampling(2, (2, 1), dim=2, method=method, init="random")
        assert torch.equal(down.kernel(), down.base)
        assert down.weight.shape == (2, 2, 2)
        assert torch.equal(down.weight, torch.zeros(2, 2, 2))


def test_autocast_kernel_float32() -> None:
    down = InvertibleDownsampling(2, 2, dim=2, method="exp")
    _perturb(down)
    x = torch.randn(1, 2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        k = down.kernel()
        y = down(x)
    assert k.dtype == torch.float32 and orthogonality_error(k) <= 1e-5
    torch.testing.assert_close(y.float(), down(x), atol=5e-2, rtol=5e-2)


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    a = InvertibleDownsampling(2, (3, 2), dim=2, init="random", method="exp")
    _perturb(a)
    torch.manual_seed(1)
    b = InvertibleDownsampling(2, (3, 2), dim=2, init="random", method="exp")
    assert set(a.state_dict()) == {"base", "weight"}
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 2, 6, 4)
    assert torch.equal(a(x), b(x))
    fixed = InvertibleUpsampling(8, 2, dim=2, learnable=False)
    assert set(fixed.state_dict()) == {"base"}


def test_attributes() -> None:
    down = InvertibleDownsampling(3, (1, 2, 2), dim=3)
    assert (down.in_channels, down.out_channels, down.stride) == (3, 12, (1, 2, 2))
    up = InvertibleUpsampling(12, (1, 2, 2), dim=3)
    assert (up.in_channels, up.out_channels) == (12, 3)
    assert up.weight.shape == (3, 4, 4)
    assert "stride=(1, 2, 2)" in repr(down)


# ---------------------------------------------------------------------------- errors
def test_bad_input_rank_channels_divisibility() -> None:
    down = InvertibleDownsampling(2, 2, dim=2)
    with pytest.raises(ValueError, match=r"dim=2 spatial dims.*got shape \(2, 8, 8\)"):
        down(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match="expected 2 channels"):
        down(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"spatial dim 1 .* size 7.*stride 2.*iUNet"):
        down(torch.randn(1, 2, 8, 7))
    with pytest.raises(ValueError, match="expected 8 channels"):
        down.inverse(torch.randn(1, 2, 4, 4))
    up = InvertibleUpsampling(8, (1, 2, 2), dim=3)
    with pytest.raises(ValueError, match="dim=3 spatial dims"):
        up(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="expected 8 channels"):
        up(torch.randn(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match=r"spatial dim 2 .* size 3"):
        up.inverse(torch.randn(1, 2, 3, 4, 3))


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="'exp', 'cayley', 'householder'"):
        InvertibleDownsampling(2, 2, method="qr")
    with pytest.raises(ValueError, match="'haar', 'pixel_shuffle', 'random', 'squeeze'"):
        InvertibleDownsampling(2, 2, init="dct")
    for bad in (0, -1, (2, 0), (2, -2)):
        with pytest.raises(ValueError, match=">= 1"):
            InvertibleDownsampling(2, bad)
    for bad in ((2, 2, 2), (2,)):
        with pytest.raises(ValueError, match="entries but dim=2"):
            InvertibleDownsampling(2, bad, dim=2)
    for bad in (2.0, (2, 1.5), "2", True):
        with pytest.raises(ValueError, match="int"):
            InvertibleDownsampling(2, bad)
    with pytest.raises(ValueError, match="dim must be"):
        InvertibleDownsampling(2, 2, dim=4)
    with pytest.raises(ValueError, match="not divisible by prod\\(stride\\)=4"):
        InvertibleUpsampling(6, 2, dim=2)
    with pytest.raises(ValueError, match="positive int"):
        InvertibleDownsampling(0, 2)
    with pytest.raises(TypeError):
        InvertibleDownsampling(2, 2, strides=2)
    with pytest.raises(TypeError):
        InvertibleUpsampling(8, 2, kernel_size=2)


# ------------------------------------------------------------- the engine's slab-wise forward
def _drawn_resampling(data, dim: int, up: bool, shared: bool, seed: int):
    """A float64 resampling of a drawn stride and channel count: ``(module, prod(stride), input size)``."""
    stride = tuple(data.draw(st.lists(st.integers(1, 3), min_size=dim, max_size=dim), label="stride"))
    fine = data.draw(st.integers(1, 3), label="fine channels")
    s = math.prod(stride)
    cls = InvertibleUpsampling if up else InvertibleDownsampling
    torch.manual_seed(seed)
    m = cls(fine * s if up else fine, stride=stride, dim=dim, init="random", shared=shared).double()
    coarse = data.draw(st.lists(st.integers(1, 3), min_size=dim, max_size=dim), label="coarse size")
    return m, s, coarse if up else [c * t for c, t in zip(coarse, stride)]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dim=st.integers(1, 3), up=st.booleans(), shared=st.booleans(),
       slab=st.sampled_from([1, 7, 64, 1 << 18]), batch=st.integers(1, 2))
def test_forward_parts_is_the_forward_of_the_joined_parts(data, dim, up, shared, slab, batch) -> None:
    """``forward_parts`` (no grad: slab by slab, parts never joined) equals ``forward`` of the
    concatenation for any stride, any cut of the input into parts and any slab size; it writes
    into ``out`` when ``out`` has the output's shape and ignores it otherwise."""
    from iunet_nb.nn import resampling

    m, s, spatial = _drawn_resampling(data, dim, up, shared, seed=0)
    x = torch.randn(batch, m.in_channels, *spatial, dtype=torch.float64)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, m.in_channels - 1)), max_size=3), label="cuts"))
    bounds = [0] + [c for c in cuts if c < m.in_channels] + [m.in_channels]
    parts = [x[:, lo:hi] for lo, hi in zip(bounds, bounds[1:])]
    want = m(x)
    default_slab = resampling._SLAB_ELEMENTS
    resampling._SLAB_ELEMENTS = slab
    try:
        with torch.no_grad():
            got = m.forward_parts(parts, m.kernel(), [False] * len(parts))
            room = torch.empty_like(want)
            into = m.forward_parts(parts, m.kernel(), [False] * len(parts), out=room)
            odd = torch.empty(batch, m.out_channels + 1, *want.shape[2:], dtype=want.dtype)
            ignored = m.forward_parts(parts, m.kernel(), [False] * len(parts), out=odd)
    finally:
        resampling._SLAB_ELEMENTS = default_slab
    assert len(got) == 1 and len(into) == 1 and into[0] is room
    for t in (got[0], into[0], ignored[0]):
        torch.testing.assert_close(t, want, rtol=1e-13, atol=1e-13)
    assert torch.equal(x, torch.cat(parts, 1))  # the input is left as it was


@settings(max_examples=40, deadline=None)
@given(dim=st.integers(1, 3), up=st.booleans(), split=st.booleans(), owned=st.booleans(),
       batch=st.integers(1, 2))
def test_backward_parts_places_x_before_the_gradient_is_touched(dim, up, split, owned, batch) -> None:
    """``place_x`` is called with the rebuilt input before anything of ``dL/dx`` exists (the
    gradient's parts still hold ``dL/dy``), and the parts it returns are the ones used: the
    engine moves ``x`` there into the memory ``y`` left, so that ``x`` and ``dL/dx`` are never
    both new tensors at once."""
    stride = (2,) * dim
    fine = 2
    cls = InvertibleUpsampling if up else InvertibleDownsampling
    torch.manual_seed(dim)
    m = cls(fine * 2 ** dim if up else fine, stride=stride, dim=dim, init="random").double()
    spatial = [2] * dim if up else [4] * dim
    x = torch.randn(batch, m.in_channels, *spatial, dtype=torch.float64, requires_grad=True)
    y = m(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    ys, dys = [y.detach().clone()], [dy.clone()]
    seen: dict = {}

    def place_x(parts):
        seen["dy intact"] = len(dys) == 1 and torch.equal(dys[0], dy)
        joined = torch.cat(parts, 1)
        seen["buffer"] = torch.empty_like(joined).copy_(joined)
        return [seen["buffer"]]

    with torch.no_grad():
        xs, dxs, dk = m.backward_parts(ys, dys, m.kernel(), True, [owned], [owned], split,
                                       place_x=place_x)
    assert seen["dy intact"]
    assert any(t.data_ptr() == seen["buffer"].data_ptr() for t in xs)
    torch.testing.assert_close(torch.cat(xs, 1), x.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(dxs, 1), x.grad, rtol=1e-12, atol=1e-12)
    assert dk is not None


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dim=st.integers(1, 3), up=st.booleans(), shared=st.booleans(),
       batch=st.integers(1, 2), chunk=st.sampled_from([1, 5, 1 << 18]), one_buffer=st.booleans())
def test_owned_runs_are_resampled_in_their_own_memory(data, dim, up, shared, batch, chunk,
                                                      one_buffer) -> None:
    """Parts the engine owns that follow one another in one buffer, where the engine allows it
    (``in_place``: that memory stays allocated anyway): ``forward_parts`` writes the
    output over them and ``backward_parts`` rebuilds the input and its gradient over the
    output's and the gradient's memory (nothing activation-sized is allocated), with the
    values of ``forward`` and of autograd, for any stride, cut, batch and chunk size; parts
    in separate buffers take the other path and give the same values."""
    from iunet_nb.nn import resampling

    m, s, spatial = _drawn_resampling(data, dim, up, shared, seed=1)
    extra = data.draw(st.integers(0, 2), label="channels before the run in its buffer")
    buffer = torch.randn(batch, extra + m.in_channels, *spatial, dtype=torch.float64)
    x = buffer[:, extra:].clone().requires_grad_(True)
    y_ref = m(x)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)

    def cut(t: torch.Tensor, group: int) -> list[torch.Tensor]:
        blocks = t.shape[1] // group
        cuts = sorted(data.draw(st.sets(st.integers(1, max(1, blocks - 1)), max_size=2), label="cuts"))
        bounds = [0] + [c * group for c in cuts if c < blocks] + [t.shape[1]]
        views = [t[:, lo:hi] for lo, hi in zip(bounds, bounds[1:])]
        return views if one_buffer else [v.clone() for v in views]

    old = resampling._IN_PLACE_ELEMENTS
    resampling._IN_PLACE_ELEMENTS = chunk
    try:
        with torch.no_grad():
            parts = cut(buffer[:, extra:], s if up else 1)
            (elsewhere,) = m.forward_parts(parts, m.kernel(), [True] * len(parts))  # not allowed
            assert elsewhere.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
            (y,) = m.forward_parts(parts, m.kernel(), [True] * len(parts), in_place=True)
            torch.testing.assert_close(y, y_ref.detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(elsewhere, y_ref.detach(), rtol=1e-12, atol=1e-12)
            assert (y.data_ptr() == parts[0].data_ptr()) == (one_buffer or len(parts) == 1)
            ys = cut(y.clone(memory_format=torch.contiguous_format), 1 if up else s)
            dys = cut(dy.clone(memory_format=torch.contiguous_format), 1 if up else s)
            y_memory, dy_memory = ys[0].data_ptr(), dys[0].data_ptr()
            xs, dxs, _ = m.backward_parts(ys, dys, m.kernel(), True, [True] * len(ys), [True] * len(dys),
                                          False, x_in_place=True, dx_in_place=True)
    finally:
        resampling._IN_PLACE_ELEMENTS = old
    torch.testing.assert_close(torch.cat(xs, 1), x.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(dxs, 1), x.grad, rtol=1e-12, atol=1e-12)
    if one_buffer:  # (separate clones: the other path, unless there is only one part)
        assert len(xs) == 1 and xs[0].data_ptr() == y_memory
        assert len(dxs) == 1 and dxs[0].data_ptr() == dy_memory
