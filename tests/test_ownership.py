"""The engine never frees, overwrites or consumes memory that someone else can reach.

Each test gives the engine one kind of owner it might overlook -- a saved-tensor
hook that caches what autograd saves, a numpy or DLPack buffer behind the incoming
gradient, a storage object the caller kept, a gradient a hook stored, a module's
backward hook -- in the default mode and in the consuming mode, and checks that
(a) the owner's memory still holds its values after the backward and (b) the
gradients equal plain autograd's in float64.  The last tests exercise the
conservative fallback of :mod:`iunet_nb.torch_internals` (every private detail
unreadable: nothing is reused, the gradients stay exact) and the reference-count
baselines under a tracer.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from iunet_nb import iUNet
from iunet_nb import torch_internals as internals
from iunet_nb.engine import fused

SHAPE = (2, 4, 8, 8)
MODES = {"default": False, "consuming": True}


def _model(consume: bool, seed: int = 0) -> iUNet:
    torch.manual_seed(seed)
    model = iUNet(channels=(4, 8, 16), architecture=(2, 1, 1), dim=2, verbose=0,
                  consume_output=consume).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _input(seed: int = 2) -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _grads(model: nn.Module, x: Tensor) -> list[Tensor]:
    return [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]


def _reference(consume: bool, backward: Callable[[nn.Module, Tensor], None]) -> list[Tensor]:
    """The gradients of plain autograd for the same model, input and backward."""
    model = _model(consume)
    model.disable_custom_gradient = True
    x = _input().requires_grad_(True)
    backward(model, x)
    return _grads(model, x)


def _assert_same(grads: list[Tensor], reference: list[Tensor]) -> None:
    assert len(grads) == len(reference)
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def _taken(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    """Record, per backward, whether the engine took ``y`` and ``dy`` (owned first parts)."""
    seen: list[tuple[bool, bool]] = []
    original = fused._backward_states

    def spy(*args: Any, **kwargs: Any) -> Any:
        st, gst = original(*args, **kwargs)
        seen.append((st.cur[0].owned, gst.cur[0].owned))
        return st, gst

    monkeypatch.setattr(fused, "_backward_states", spy)
    return seen


# ------------------------------------------------------------------------ saved-tensor hooks
@pytest.mark.parametrize("mode", MODES)
def test_a_saved_tensor_hook_cache_is_never_freed(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pack hook that keeps ``t.detach()`` (an activation logger) keeps valid tensors."""
    consume = MODES[mode]

    def step(model: nn.Module, x: Tensor) -> None:
        cache: dict[int, tuple[Tensor, Tensor, int]] = {}

        def pack(t: Tensor) -> int:
            cache[len(cache)] = (t.detach(), t.detach().clone(), t.untyped_storage().nbytes())
            return len(cache) - 1

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda k: cache[k][0]):
            loss = (2 * model(x)).square().sum()  # the caller keeps only the loss
        loss.backward()
        for kept, snapshot, nbytes in cache.values():  # same memory and values as when saved
            assert kept.untyped_storage().nbytes() == nbytes
            assert torch.equal(kept, snapshot)

    taken = _taken(monkeypatch)
    model, x = _model(consume), _input().requires_grad_(True)
    step(model, x)
    assert taken and not taken[0][0], "the output was taken although a pack hook saw it"
    _assert_same(_grads(model, x), _reference(consume, step))


# ------------------------------------------------------------------------ memory torch does not count
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("source", ["numpy", "dlpack"])
def test_an_external_buffer_behind_the_gradient_is_left_intact(mode: str, source: str) -> None:
    consume = MODES[mode]
    buffer = np.random.default_rng(0).standard_normal(SHAPE)
    snapshot = buffer.copy()

    def step(model: nn.Module, x: Tensor) -> None:
        y = model(x)
        g = torch.from_numpy(buffer) if source == "numpy" else torch.from_dlpack(buffer)
        y.backward(g)
        del g

    model, x = _model(consume), _input().requires_grad_(True)
    step(model, x)
    np.testing.assert_array_equal(buffer, snapshot)
    _assert_same(_grads(model, x), _reference(consume, step))


@pytest.mark.parametrize("mode", MODES)
def test_a_storage_object_the_caller_kept_is_not_emptied(mode: str) -> None:
    consume = MODES[mode]
    kept: list[tuple[Any, Tensor]] = []

    def step(model: nn.Module, x: Tensor) -> None:
        y = model(x)
        kept.append((y.untyped_storage(), y.detach().clone()))
        loss = (3 * y).sum()  # does not save y
        del y
        loss.backward()

    model, x = _model(consume), _input().requires_grad_(True)
    step(model, x)
    storage, snapshot = kept[0]
    assert storage.nbytes() == snapshot.numel() * snapshot.element_size()
    values = torch.empty(0, dtype=snapshot.dtype).set_(storage, 0, snapshot.shape, snapshot.stride())
    assert torch.equal(values, snapshot)
    _assert_same(_grads(model, x), _reference(consume, step))


# ------------------------------------------------------------------------ hooks that keep the gradient
def test_a_gradient_a_hook_stored_stays_readable_by_default() -> None:
    """By default a hook of a dropped output may keep the gradient object itself."""
    kept: list[Tensor] = []

    def step(model: nn.Module, x: Tensor) -> None:
        y = model(x)
        y.register_hook(lambda g: kept.append(g))
        loss = (2 * y).sum()
        del y
        loss.backward()

    model, x = _model(False), _input().requires_grad_(True)
    step(model, x)
    assert torch.equal(kept[0], torch.full(SHAPE, 2.0, dtype=torch.float64))
    _assert_same(_grads(model, x), _reference(False, step))


@pytest.mark.parametrize("mode", MODES)
def test_a_module_backward_hook_keeps_its_grad_output(mode: str) -> None:
    consume = MODES[mode]
    kept: list[Tensor] = []

    def step(model: nn.Module, x: Tensor) -> None:
        handle = model.register_full_backward_hook(lambda m, gi, go: kept.append(go[0]))
        try:
            w = torch.linspace(-1, 1, x.numel(), dtype=x.dtype).reshape(x.shape)
            (model(x) * w).sum().backward()
        finally:
            handle.remove()

    model, x = _model(consume), _input().requires_grad_(True)
    step(model, x)
    w = torch.linspace(-1, 1, x.numel(), dtype=x.dtype).reshape(x.shape)
    if not consume:
        assert torch.equal(kept[0], w)
    _assert_same(_grads(model, x), _reference(consume, step))


def test_the_baselines_ignore_a_tracer_that_reads_frame_locals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured while a debugger-like tracer reads every frame's locals, the baselines are the
    same as without it (the measurement switches the tracer off), and a gradient a hook kept
    is still not reused."""
    clean = internals.reference_baselines()
    assert clean is not None
    monkeypatch.setattr(internals, "_baselines", None)

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        frame.f_locals  # noqa: B018 - what a variable-inspecting tool does
        return tracer

    sys.settrace(tracer)
    try:
        traced = internals.reference_baselines()
    finally:
        sys.settrace(None)
    assert traced == clean
    test_a_gradient_a_hook_stored_stays_readable_by_default()


# ------------------------------------------------------------------------ what is still reused
def test_an_unreachable_output_and_gradient_are_still_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default mode keeps its saving where nothing else can reach the memory: the body
    followed by a layer, the caller keeping only the loss."""
    taken = _taken(monkeypatch)
    model, x = _model(False), _input().requires_grad_(True)
    head = nn.Conv2d(4, 1, 1).double()
    head(model(x)).square().sum().backward()
    assert taken == [(True, True)]


# ------------------------------------------------------------------------ the fallback
@pytest.mark.parametrize("mode", MODES)
def test_without_private_details_nothing_is_reused_and_gradients_are_exact(
        mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    consume = MODES[mode]
    taken = _taken(monkeypatch)

    def step(model: nn.Module, x: Tensor) -> None:
        head = nn.Conv2d(4, 1, 1).double()
        torch.nn.init.constant_(head.weight, 0.5)
        head(model(x)).square().sum().backward()

    model, x = _model(consume), _input().requires_grad_(True)
    with internals.unavailable():
        assert internals.reference_baselines() is None
        assert internals.graph_is_kept() and internals.saved_tensor_hooks_active()
        assert internals.storage_use_count(x) is None and internals.will_accumulate(x) is None
        step(model, x)
    assert taken == [(False, False)]
    _assert_same(_grads(model, x), _reference(consume, step))


def test_a_kept_graph_keeps_the_output_for_the_next_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """``retain_graph=True``: the backward will run again from ``y``, so ``y`` is not taken, and
    both backwards give plain autograd's gradients."""
    taken = _taken(monkeypatch)

    def step(model: nn.Module, x: Tensor) -> None:
        head = nn.Conv2d(4, 1, 1).double()
        torch.nn.init.constant_(head.weight, 0.5)
        loss = head(model(x)).square().sum()
        loss.backward(retain_graph=True)
        loss.backward()

    model, x = _model(False), _input().requires_grad_(True)
    step(model, x)
    assert taken[0][0] is False
    _assert_same(_grads(model, x), _reference(False, step))
