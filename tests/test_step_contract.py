"""Every step type of the engine conforms to the step contract (iunet_nb.engine.contract).

``check_step`` runs a step forward and backward on float64 channel parts and compares
output, rebuilt input and gradients with autograd; the modules inside the steps are
also run through ``check_invertible``.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from iunet_nb import engine as eng
from iunet_nb.common import CONV
from iunet_nb.engine import coupling_backward, steps
from iunet_nb.nn import tiled
from iunet_nb.engine.checks import check_step
from iunet_nb.nn.checks import check_invertible
from iunet_nb.nn.coupling import AdditiveCoupling, create_standard_module
from iunet_nb.nn.mixing import OrthogonalChannelMixing
from iunet_nb.nn.resampling import InvertibleDownsampling, InvertibleUpsampling
from iunet_nb.nn.stack import InvertibleSequential

DIMS = (1, 2, 3)
CHANNELS = 4


def _probe(channels: int, dim: int, seed: int = 0) -> torch.Tensor:
    size = 6 if dim < 3 else 4
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, *([size] * dim), generator=g, dtype=torch.float64)


def _perturbed(module: nn.Module, seed: int = 1) -> nn.Module:
    module = module.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _user_coupling(dim: int) -> AdditiveCoupling:
    f = nn.Sequential(CONV[dim](2, 2, 3, padding=1), nn.Tanh())
    return AdditiveCoupling(f, CHANNELS, 2)


def _standard(dim: int, depth: int = 1) -> AdditiveCoupling:
    return create_standard_module(CHANNELS, dim=dim, depth=depth, zero_init=False)


STEP_FACTORIES: dict[str, Callable[[int], tuple[eng.Step, nn.Module | None, int]]] = {
    # name -> dim -> (step, module inside it, input channels)
    "coupling-standard": lambda d: _with_module(eng.CouplingStep, _standard(d), CHANNELS),
    "coupling-standard-depth2": lambda d: _with_module(eng.CouplingStep, _standard(d, 2), CHANNELS),
    "coupling-user-function": lambda d: _with_module(eng.CouplingStep, _user_coupling(d), CHANNELS),
    "invertible-module": lambda d: _with_module(
        eng.InvertibleModuleStep, InvertibleSequential(_standard(d), _user_coupling(d)), CHANNELS),
    "kernel-mixing": lambda d: _kernel(OrthogonalChannelMixing(CHANNELS, dim=d), CHANNELS),
    "kernel-downsampling": lambda d: _kernel(InvertibleDownsampling(CHANNELS, dim=d), CHANNELS),
    "kernel-downsampling-split": lambda d: _kernel(InvertibleDownsampling(CHANNELS, dim=d), CHANNELS,
                                                   split_output=True),
    "kernel-upsampling": lambda d: _kernel(InvertibleUpsampling(CHANNELS * 2 ** d, dim=d),
                                           CHANNELS * 2 ** d),
    "split": lambda d: (eng.SplitStep(1), None, CHANNELS),
}


def _with_module(step_type: type, module: nn.Module, channels: int):
    module = _perturbed(module)
    return step_type(module, True), module, channels


def _kernel(module: nn.Module, channels: int, split_output: bool = False):
    module = _perturbed(module)
    return eng.KernelStep(module, split_output=split_output), module, channels


@pytest.mark.parametrize("input_owned", [False, True])
@pytest.mark.parametrize("name", sorted(STEP_FACTORIES))
@pytest.mark.parametrize("dim", DIMS)
def test_step_conforms(name: str, dim: int, input_owned: bool) -> None:
    step, module, channels = STEP_FACTORIES[name](dim)
    x = _probe(channels, dim)
    y = check_step(step, x, input_owned=input_owned)
    if module is not None:
        resampling = isinstance(module, (InvertibleDownsampling, InvertibleUpsampling))
        check_invertible(module, x, where=name, same_shape=not resampling)
        with torch.no_grad():
            assert torch.allclose(y, module(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("input_owned", [False, True])
@pytest.mark.parametrize("dim", DIMS)
def test_concat_step_conforms(dim: int, input_owned: bool) -> None:
    x, skip = _probe(3, dim), _probe(2, dim, seed=1)
    y = check_step(eng.ConcatStep(2), x, skip, input_owned=input_owned)
    assert torch.equal(y, torch.cat([skip, x], dim=1))


def _slab_forward_coupling(dim: int):
    module = _perturbed(_standard(dim))
    return eng.CouplingStep(module, True, slabs=True, slab_forward=True), module, CHANNELS


@pytest.mark.parametrize("input_owned", [False, True])
@pytest.mark.parametrize("dim", DIMS)
def test_slabwise_forward_conforms_on_many_tiles(dim: int, input_owned: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The consuming mode's slab-wise coupling forward, with every slab path taken."""
    monkeypatch.setattr(steps, "SLAB_MIN_BYTES", 0)
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", 24)
    step, module, channels = _slab_forward_coupling(dim)
    x = _probe(channels, dim)
    y = check_step(step, x, input_owned=input_owned)
    with torch.no_grad():
        assert torch.allclose(y, module(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("conv_kernels", ["tiled", "whole"])
@pytest.mark.parametrize("name", ["coupling-standard", "kernel-downsampling-split"])
@pytest.mark.parametrize("dim", DIMS)
def test_slabwise_and_device_branches_conform(name: str, dim: int, conv_kernels: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The slab-wise recomputation, many tiles, and the whole-tensor (GPU) convolutions on CPU."""
    monkeypatch.setattr(steps, "SLAB_MIN_BYTES", 0)
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", 24)
    kernels = tiled.TILED_CONV3 if conv_kernels == "tiled" else tiled.WHOLE_CONV3
    monkeypatch.setattr(coupling_backward, "conv3_kernels_for", lambda device, backward_elements=0: kernels)
    step, _, channels = STEP_FACTORIES[name](dim)
    check_step(step, _probe(channels, dim), input_owned=True)


def _reference_block_backward(coupling: AdditiveCoupling, v: torch.Tensor, g: torch.Tensor):
    v = v.clone().requires_grad_(True)
    fv = coupling.f(v)
    params = list(coupling.f.parameters())
    grads = torch.autograd.grad(fv, [v] + params, g)
    return fv.detach(), grads[0], list(grads[1:])


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("slabs", [False, True])
@pytest.mark.parametrize("kernels", [tiled.TILED_CONV3, tiled.WHOLE_CONV3], ids=["tiled", "whole"])
@pytest.mark.parametrize("dim", DIMS)
def test_fused_coupling_backward_equals_autograd(dim: int, kernels, slabs: bool, accumulate: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """recompute_and_backward against autograd, for both kernel choices and both slab modes."""
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", 24)
    coupling = _perturbed(_standard(dim))
    v, g = _probe(2, dim, seed=2), _probe(2, dim, seed=3)
    fv, dv_ref, grads_ref = _reference_block_backward(coupling, v, g)
    target = fv + 1.0
    grad_v = torch.ones_like(v) if accumulate else None
    dv, grads = coupling_backward.recompute_and_backward(
        coupling.f.fused_block(), [v], [g], [target], [grad_v] if accumulate else None,
        slabs=slabs, kernels=kernels)
    assert torch.allclose(target, torch.ones_like(target), rtol=0, atol=1e-12)
    if accumulate:
        assert dv is None and torch.allclose(grad_v, dv_ref + 1.0, rtol=0, atol=1e-12)
    else:
        assert torch.allclose(dv, dv_ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, grads_ref):
        assert torch.allclose(got, want, rtol=0, atol=1e-11)


@settings(max_examples=40, deadline=None)
@given(dim=st.sampled_from(DIMS), cin=st.integers(1, 5), cout=st.integers(1, 5),
       size=st.integers(1, 7), batch=st.integers(1, 2), tile=st.integers(1, 200),
       cut=st.data())
def test_slabwise_block_output_equals_the_whole_one(dim: int, cin: int, cout: int, size: int, batch: int,
                                                    tile: int, cut: st.DataObject) -> None:
    """``target += f(v)`` slab by slab equals the one-pass forward, for any tiles and channel cuts."""
    torch.manual_seed(dim * 100 + cin * 10 + cout)
    shape = (size,) * dim
    block = eng.ConvLeakyReLUGroupNorm(torch.randn((cout, cin) + (3,) * dim, dtype=torch.float64),
                                       0.2, torch.randn(cout, dtype=torch.float64),
                                       torch.randn(cout, dtype=torch.float64), 1e-5)
    v = torch.randn(batch, cin, *shape, dtype=torch.float64)
    u = torch.randn(batch, cout, *shape, dtype=torch.float64)
    want = coupling_backward.add_block_output(block, [v], [u.clone()], True)
    v_cut = cut.draw(st.integers(0, cin), label="v cut")
    u_cut = cut.draw(st.integers(0, cout), label="u cut")
    v_parts = [p for p in (v[:, :v_cut], v[:, v_cut:]) if p.shape[1]]
    got = u.clone()
    u_parts = [p for p in (got[:, :u_cut], got[:, u_cut:]) if p.shape[1]]
    old = tiled.TILE_ELEMENTS
    tiled.TILE_ELEMENTS = tile
    try:
        coupling_backward.add_block_output_slabwise(block, v_parts, u_parts)
    finally:
        tiled.TILE_ELEMENTS = old
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


class _WrongInverseStep(eng.Step):
    """Doubles its input but 'rebuilds' it as the output itself: the checker must object."""

    def forward(self, st, tensors, record):
        st.cur = [eng.Part(eng.parts.join(st.cur) * 2, True)]

    def backward(self, st, gst, tensors, record):
        gst.cur = [eng.Part(eng.parts.join(gst.cur) * 2, True)]
        return []


def test_checker_catches_a_step_that_does_not_rebuild_its_input() -> None:
    with pytest.raises(AssertionError, match="rebuilt input"):
        check_step(_WrongInverseStep(), _probe(2, 2))


def test_step_is_an_abstract_interface() -> None:
    with pytest.raises(TypeError):
        eng.Step()  # type: ignore[abstract]
    with pytest.raises(TypeError, match="OrthogonalKernelModule"):
        eng.KernelStep(nn.Identity())
