"""Gradients of models that loaded an ``iunets`` 0.1 checkpoint (float64).

A reference checkpoint reorders the decoder's channel mixing of an
``iunet_nb.iUNet`` and rebuilds couplings as the reference's block.  For drawn
configurations that the reference supports, after loading its state dict:

* both memory-efficient engines (``me_backend='fused'`` and ``'memcnn'``) give the
  output and every gradient (input and parameters) of plain autograd
  (``disable_custom_gradient=True``) on the same model, to 1e-9 relative; after
  one SGD step the three models are still equal and ``inverse`` is still exact;
* the reference's own plain-autograd gradient agrees with ours where it is right.
  Its custom backward of the orthogonal parametrisations (``iunets.cayley`` and
  ``iunets.expm``) is wrong (see ``test_reference_orthogonal_backward_is_wrong``),
  but only the gradients of its orthogonal weights ``W`` pass through it; the
  input gradient and the couplings' gradients are compared with the reference as
  it is (to 1e-8: its float64 Pade ``expm`` forward is off by up to ~2e-10), and
  everything, ``W`` included, with the reference after swapping those two
  functions for torch's ``linalg.solve`` / ``linalg.matrix_exp`` and their
  autograd (to 1e-9).

The parametrisations differ (the reference trains ``W`` with kernel ``Q(W)``, a
converted layer trains ``w`` with kernel ``Q(W_0) @ O(w)``, ``w = 0``), so the
gradient of ``W`` is predicted from ours: at ``w = 0``, ``dO = c (dw - dw^T)``
(``c = 2`` for Cayley, 1 for exp), so ``g_w = c (M - M^T)`` with ``M = B^T G``,
``B`` the kernel and ``G`` the loss gradient of the kernel.  The tangent part of
``G`` is ``B (M - M^T) / 2 = B g_w / (2c)``; the reference's ``dL/dW`` is the
vector-Jacobian product of ``W -> Q(W)`` with it (``Q(W)`` stays orthogonal, so
only the tangent part of ``G`` matters).  1D models are checked between the
engines only: the reference's 1D iUNet cannot run (its 1D upsampling fails).
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

iunets = pytest.importorskip("iunets", reason="the reference package iunets 0.1 is not installed")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import iunets.layers as R  # noqa: E402
    from iunets.cayley import cayley as ref_cayley  # noqa: E402
    from iunets.expm import expm as ref_expm  # noqa: E402

import iunet_nb  # noqa: E402
from iunet_nb import networks  # noqa: E402
from iunet_nb.nn.orthogonal import OrthogonalBaseMixin  # noqa: E402

torch.set_num_threads(1)
DT = torch.float64
TOL = 1e-9
#: against the reference as it is: its float64 Pade ``expm`` forward is off by up to ~2e-10.
REF_TOL = 1e-8
#: derivative of this package's ``orthogonal_matrix`` at 0: ``dO = c (dw - dw^T)``.
_C = {"cayley": 2.0, "exp": 1.0}


def _torch_cayley(M: torch.Tensor) -> torch.Tensor:
    """The reference's Cayley transform ``(I + M)^{-1} (I - M)`` with torch's autograd, ``(..., n, n)``."""
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    return torch.linalg.solve(eye + M, eye - M)


class _Apply:
    """Stands in for a ``torch.autograd.Function`` (only ``.apply`` is used by the reference)."""

    def __init__(self, fn):
        self.apply = fn


@contextlib.contextmanager
def correct_reference_backward() -> Iterator[None]:
    """The reference's layers with its Cayley transform and matrix exponential differentiated by torch."""
    saved = R.cayley, R.expm
    R.cayley, R.expm = _Apply(_torch_cayley), _Apply(torch.linalg.matrix_exp)
    try:
        yield
    finally:
        R.cayley, R.expm = saved


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _our_name(ref_name: str) -> str:
    """A reference parameter's name in a converted model (memcnn's ``_fn`` gone, ``F.seq`` -> ``f``)."""
    return ref_name.replace("._fn.", ".").replace(".F.seq.", ".f.")


# The 0.1 API as the reference accepts it; stride 2 (the reference's only Haar stride).
def configs(dims: tuple[int, ...] = (1, 2, 3), max_blocks: int = 2) -> st.SearchStrategy[dict]:
    """Arguments of ``iunets.iUNet`` (0.1 API) for ``dims``, at most ``max_blocks`` couplings per
    level and side, small enough for a CPU test."""
    return st.fixed_dictionaries({
        "dim": st.sampled_from(dims),
        "in_channels": st.integers(2, 5),
        "architecture": st.lists(st.integers(1, max_blocks), min_size=2, max_size=3).map(tuple),
        "slice_mode": st.sampled_from(["double", "constant"]),
        "resampling_method": st.sampled_from(["cayley", "exp"]),
        "resampling_init": st.sampled_from(["haar", "squeeze"]),
        "learnable_resampling": st.booleans(),
        "channel_mixing_freq": st.sampled_from([-1, 0, 1, 2]),
        "channel_mixing_method": st.sampled_from(["cayley", "exp"]),
        "learnable_channel_mixing": st.booleans(),
        "module_kwargs": st.fixed_dictionaries({"block_depth": st.integers(1, 2)}),
    })


def _reference(cfg: dict, seed: int, disable: bool = True) -> torch.nn.Module:
    """A float64 reference iUNet with random weights (all of them, so ``W != 0`` and couplings act)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = iunets.iUNet(**cfg, verbose=0, disable_custom_gradient=disable)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return ref.to(DT)


def _inputs(cfg: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ``(2, C, 8, ...)`` (``4`` per side in 3D) and a fixed output weighting of the same shape (loss ``sum(y * v)``)."""
    g = torch.Generator().manual_seed(seed + 1)
    shape = (2, cfg["in_channels"], *([8 if cfg["dim"] < 3 else 4] * cfg["dim"]))
    return torch.randn(shape, dtype=DT, generator=g), torch.randn(shape, dtype=DT, generator=g)


def _step(model: torch.nn.Module, x: torch.Tensor, v: torch.Tensor):
    """Output, input gradient and parameter gradients (by name) of the loss ``sum(y * v)``."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = model(x)
    (y * v).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def _load(cls: type, cfg: dict, state: dict, used: bool = False) -> torch.nn.Module:
    """A float64 ``cls`` of ``cfg`` that loaded ``state``; if ``used``, both engines ran it before."""
    model = cls(**cfg, verbose=0).to(DT)
    if used:  # the engines' caches (memcnn wrappers, steps) must follow the reordering
        x, v = _inputs(cfg, 0)
        for backend in ("fused", "memcnn"):
            model.me_backend = backend
            _step(model, x, v)
        model.me_backend = "fused"
    model.load_state_dict(state, strict=True)
    return model


@settings(max_examples=25, deadline=None)
@given(cfg=configs(), seed=st.integers(0, 2**16), modern=st.booleans(), lr=st.floats(1e-3, 0.1),
       used=st.booleans())
def test_engines_match_plain_autograd_after_loading_a_reference_checkpoint(cfg, seed, modern, lr, used):
    state = _reference(cfg, seed).state_dict()
    cls = iunet_nb.iUNet if modern else networks.iUNet
    model = _load(cls, cfg, state, used)
    x, v = _inputs(cfg, seed)
    runs = {}
    for name, disable, backend in (("plain", True, "fused"), ("fused", False, "fused"),
                                   ("memcnn", False, "memcnn")):
        model.disable_custom_gradient, model.me_backend = disable, backend
        runs[name] = _step(model, x, v)
    y0, gx0, gp0 = runs["plain"]
    assert gp0 and all(g is not None for g in gp0.values())
    for name in ("fused", "memcnn"):
        y, gx, gp = runs[name]
        assert _rel(y, y0) <= TOL, name
        assert _rel(gx, gx0) <= TOL, name
        assert gp.keys() == gp0.keys(), name
        for key, g in gp.items():
            assert g is not None and _rel(g, gp0[key]) <= TOL, (name, key)

    # one SGD step with each engine's gradients, from the same start: still the same model, still exact
    after = {}
    for name, (_, _, gp) in runs.items():
        twin = _load(cls, cfg, state)
        twin.disable_custom_gradient, twin.me_backend = name == "plain", "memcnn" if name == "memcnn" else "fused"
        with torch.no_grad():
            for key, p in twin.named_parameters():
                p -= lr * gp[key]
        after[name] = twin
    with torch.no_grad():
        y_plain = after["plain"](x)
        for name, twin in after.items():
            y = twin(x)
            assert _rel(y, y_plain) <= TOL, name
            assert (twin.inverse(y) - x).abs().max().item() <= 1e-10, name
    for name in ("fused", "memcnn"):  # and the engines' next gradients still match
        y, gx, _ = _step(after[name], x, v)
        _, gx_plain, _ = _step(after["plain"], x, v)
        assert _rel(gx, gx_plain) <= TOL, name


@settings(max_examples=25, deadline=None)
@given(cfg=configs((2, 3)), seed=st.integers(0, 2**16), modern=st.booleans(),
       backend=st.sampled_from(["fused", "memcnn"]))
def test_gradients_match_the_reference_models_own(cfg, seed, modern, backend):
    """Ours (memory-efficient) against the reference's plain autograd, parameter by parameter."""
    x, v = _inputs(cfg, seed)
    ref = _reference(cfg, seed)
    cls = iunet_nb.iUNet if modern else networks.iUNet
    model = _load(cls, cfg, ref.state_dict())
    model.me_backend = backend
    y, gx, gp = _step(model, x, v)
    y_ref, gx_ref, gp_ref = _step(ref, x, v)  # the reference as it is
    with correct_reference_backward():
        y_fix, gx_fix, gp_fix = _step(ref, x, v)  # its orthogonal layers differentiated by torch
    assert _rel(y, y_fix) <= TOL and _rel(y, y_ref) <= REF_TOL
    assert _rel(gx, gx_fix) <= TOL and _rel(gx, gx_ref) <= REF_TOL
    modules = dict(model.named_modules())
    assert {_our_name(n) for n in gp_ref} == set(gp)
    orthogonal = 0
    for ref_name, g_ref in gp_ref.items():
        ours = _our_name(ref_name)
        layer = modules[ours.rsplit(".", 1)[0]]
        if not isinstance(layer, OrthogonalBaseMixin):  # a coupling's convolution or GroupNorm
            assert _rel(gp[ours], gp_fix[ref_name]) <= TOL, ref_name
            assert _rel(gp[ours], g_ref) <= REF_TOL, ref_name
            continue
        orthogonal += 1
        assert layer.weight.detach().abs().max().item() == 0.0
        B = layer.base
        tangent = B @ gp[ours] / (2 * _C[layer.method])
        W = dict(ref.named_parameters())[ref_name].detach().clone().requires_grad_(True)
        Q = (_torch_cayley if layer.method == "cayley" else torch.linalg.matrix_exp)(W - W.mT)
        assert (Q.detach() - B).abs().max().item() <= 1e-12, ref_name
        predicted, = torch.autograd.grad(Q, W, tangent)
        assert _rel(predicted, gp_fix[ref_name]) <= TOL, ref_name
    assert orthogonal == sum(isinstance(m, OrthogonalBaseMixin) and m.weight is not None
                             for m in model.modules())  # every learnable orthogonal layer was checked


@pytest.mark.parametrize("method", ["cayley", "exp"])
def test_reference_orthogonal_backward_is_wrong(method):
    """The reference's custom backward of ``Q(A)`` (float64, skew ``A``) is not the derivative of its forward."""
    g = torch.Generator().manual_seed(0)
    fn, exact = (ref_cayley, _torch_cayley) if method == "cayley" else (ref_expm, torch.linalg.matrix_exp)
    worst = 0.0
    for scale in (0.0, 0.3, 2.0):
        W = torch.randn(4, 4, dtype=DT, generator=g) * scale
        A = (W - W.T).requires_grad_(True)
        G = torch.randn(4, 4, dtype=DT, generator=g)
        assert (fn.apply(A) - exact(A)).abs().max().item() <= 1e-12  # the forward is right
        got, = torch.autograd.grad(fn.apply(A), A, G)
        want, = torch.autograd.grad(exact(A), A, G)
        worst = max(worst, _rel(got, want))
    assert worst > 0.1
