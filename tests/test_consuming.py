"""The fused engine's opt-in consuming mode (``iUNet(..., consume_output=True)``).

The backward takes over the memory of the output and of its incoming gradient
(ownership note 9 of :mod:`iunet_nb.engine.contract`).  Checked here: the
gradients equal plain autograd's in float64; the output fails loudly after the
backward, and so does a second backward; gradients that something else may
read (``y.sum()``'s expanded one, one passed explicitly, one a hook keeps) and
outputs that other tensors share are left intact; the caller's input is
untouched; the mode saves about two input-sized tensors of peak memory.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor

from iunet_nb import iUNet
from iunet_nb.engine import CONSUMED_MESSAGE, ConsumedTensor, steps
from iunet_nb.nn import tiled
from test_properties import Case, cases, create_norm_dropout_module

CONSUMED = "consume_output=True: the output was consumed"

#: Small models: 1D/2D/3D, mixing on and off, cropped and padded outputs, a user block.
MODELS = {
    "1d": (dict(channels=(3, 6, 12), architecture=(2, 1, 1), dim=1), (2, 3, 16)),
    "2d": (dict(channels=(4, 8, 16), architecture=(2, 1, 1), dim=2), (2, 4, 16, 12)),
    "2d_no_mixing": (dict(channels=(4, 8, 16), architecture=(1, 2, 1), dim=2, channel_mixing_freq=0),
                     (1, 4, 8, 8)),
    "2d_cropped": (dict(channels=(4, 8, 16), architecture=(1, 1, 1), dim=2), (1, 4, 10, 7)),
    "2d_padded": (dict(channels=(4, 8, 16), architecture=(1, 1, 1), dim=2, revert_input_padding=False),
                  (1, 4, 10, 7)),
    "3d": (dict(channels=(2, 16, 32), architecture=(1, 1, 1), dim=3), (1, 2, 4, 8, 4)),
    "seed_2d": (dict(channels=(64, 128, 256, 384), architecture=(2, 2, 2, 2), dim=2), (1, 64, 8, 8)),
    "user_block": (dict(channels=(4, 8), architecture=(2, 1), dim=2,
                        create_module_fn=create_norm_dropout_module), (2, 4, 8, 8)),
}

#: The body of ``bench volume3d``'s model (a skip of 12 of 16 channels at the finest level).
VOLUME_BODY = Case(dict(channels=(16, 32, 64, 128), architecture=(2, 2, 2, 2), dim=3), 1, (16, 16, 16))


def _model(kwargs: dict, seed: int = 0, **extra) -> iUNet:
    torch.manual_seed(seed)
    model = iUNet(verbose=0, consume_output=True, **kwargs, **extra).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _input(shape: tuple[int, ...], seed: int = 2) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run(model: iUNet, x: Tensor, loss_fn: Callable[[Tensor], Tensor], conventional: bool,
         seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    """``(the output's values, [dL/dx] + every parameter's gradient)`` of one step."""
    model.disable_custom_gradient = conventional
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout masks in both runs
    y = model(x)
    values = y.detach().clone()
    loss_fn(y).backward()
    grads = [x.grad] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                        for p in model.parameters()]
    return values, grads


def _weighted(shape: torch.Size, seed: int = 3) -> Callable[[Tensor], Tensor]:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return lambda y: (y * w).sum() + y.square().sum()


def _assert_close(got: list[Tensor], want: list[Tensor], tol: float = 1e-10) -> None:
    scale = max(1.0, max(g.abs().max().item() for g in want))
    for i, (a, b) in enumerate(zip(got, want)):
        err = (a - b).abs().max().item() / scale
        assert err <= tol, f"gradient {i} differs from autograd by {err:.3g} (relative)"


def _consumed_step(model: iUNet, x: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, list[Tensor]]:
    """The consuming step; returns the (consumed) output and the gradients."""
    model.disable_custom_gradient = False
    model.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    y = model(xg)
    loss_fn(y).backward()
    return y, [xg.grad] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                           for p in model.parameters()]


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_equal_autograd_and_output_is_consumed(name: str) -> None:
    kwargs, shape = MODELS[name]
    model = _model(kwargs)
    model.train()
    x = _input(shape)
    x_before = x.clone()
    with torch.no_grad():
        loss_fn = _weighted(model(x).shape)
    torch.manual_seed(0)
    y, got = _consumed_step(model, x, loss_fn)
    _, want = _run(model, x, loss_fn, conventional=True)
    _assert_close(got, want)
    assert isinstance(y, ConsumedTensor), "the output was not taken over"
    assert torch.equal(x, x_before), "the caller's input was modified"


def test_chained_models_consume_each_other_exactly() -> None:
    """The first model's output is the second's input, which the second never needs again."""
    kwargs, shape = MODELS["2d"]
    first, second = _model(kwargs, seed=0), _model(kwargs, seed=5)
    chain = torch.nn.Sequential(first, second)
    x = _input(shape)
    loss_fn = _weighted(torch.Size(shape))
    grads = {}
    for conventional in (True, False):
        first.disable_custom_gradient = second.disable_custom_gradient = conventional
        chain.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        middle = first(xg)
        loss_fn(second(middle)).backward()
        grads[conventional] = [xg.grad] + [p.grad.clone() for p in chain.parameters()]
    _assert_close(grads[False], grads[True])
    assert isinstance(middle, ConsumedTensor)


@pytest.mark.slow
@settings(max_examples=30)
@example(case=VOLUME_BODY, slabbed=True)
@given(case=cases(), slabbed=st.booleans())
def test_gradients_equal_autograd_property(case: Case, slabbed: bool) -> None:
    """``slabbed``: every coupling takes the slab-wise forward and backward, in small tiles."""
    model = case.build()
    model.consume_output = True
    model.train()
    x = case.input(model)
    with torch.no_grad():
        loss_fn = _weighted(model(x).shape, case.seed + 3)
    with ExitStack() as stack:
        if slabbed:
            stack.enter_context(mock.patch.object(steps, "SLAB_MIN_BYTES", 0))
            stack.enter_context(mock.patch.object(tiled, "TILE_ELEMENTS", 64))
        torch.manual_seed(case.seed)
        y, got = _consumed_step(model, x, loss_fn)
    _, want = _run(model, x, loss_fn, conventional=True, seed=case.seed)
    _assert_close(got, want)
    assert isinstance(y, ConsumedTensor)


# ----------------------------------------------------------------------------- loud failures
@pytest.fixture
def consumed() -> tuple[iUNet, Tensor]:
    """A model and its output after a consuming backward (the output is cropped)."""
    kwargs, shape = MODELS["2d_cropped"]
    model = _model(kwargs)
    y, _ = _consumed_step(model, _input(shape), _weighted(torch.Size(shape)))
    return model, y


@pytest.mark.parametrize("use", [
    lambda y: y + 1, lambda y: y.sum(), lambda y: y.clone(), lambda y: y.numpy(),
    lambda y: y[0, 0, 0, 0].item(), lambda y: torch.cat([y, y]), lambda y: y.detach(),
    lambda y: y.float(), lambda y: y.tolist(),
], ids=["add", "sum", "clone", "numpy", "item", "cat", "detach", "float", "tolist"])
def test_using_the_output_after_backward_raises(consumed: tuple[iUNet, Tensor], use: Callable) -> None:
    _, y = consumed
    with pytest.raises(RuntimeError, match=CONSUMED):
        use(y)


def test_consumed_output_keeps_its_metadata_and_inverse_raises(consumed: tuple[iUNet, Tensor]) -> None:
    model, y = consumed
    assert y.shape == (1, 4, 10, 7) and y.dtype == torch.float64 and y.dim() == 4
    assert "consumed by the backward" in repr(y)
    with pytest.raises(RuntimeError, match=CONSUMED):
        model.inverse(y)


def test_second_backward_raises_the_clear_error() -> None:
    kwargs, shape = MODELS["2d"]
    model = _model(kwargs)
    x = _input(shape).requires_grad_(True)
    y = model(x)
    w = torch.randn(y.shape, dtype=torch.float64)
    loss = (y * w).sum()  # the loss keeps w, not y
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=CONSUMED) as info:
        loss.backward()
    assert str(info.value) == CONSUMED_MESSAGE


def test_second_backward_through_a_loss_that_saved_the_output_raises() -> None:
    kwargs, shape = MODELS["2d"]
    model = _model(kwargs)
    y = model(_input(shape).requires_grad_(True))
    loss = y.square().sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):  # autograd's version check on the loss's saved y
        loss.backward()


# ----------------------------------------------------------------------------- what is left intact
def test_expanded_gradient_of_sum_gives_exact_gradients() -> None:
    kwargs, shape = MODELS["2d"]
    model = _model(kwargs)
    x = _input(shape)
    y, got = _consumed_step(model, x, lambda y: y.sum())
    _, want = _run(model, x, lambda y: y.sum(), conventional=True)
    _assert_close(got, want)
    assert isinstance(y, ConsumedTensor)


@pytest.mark.parametrize("keep", ["retain_grad", "hook"])
def test_gradient_the_caller_keeps_is_not_corrupted(keep: str) -> None:
    """``y.retain_grad()`` (autograd stores a copy) and a hook keeping its argument (not taken)."""
    kwargs, shape = MODELS["2d"]
    model = _model(kwargs)
    x = _input(shape)
    w = torch.randn(shape, dtype=torch.float64)
    values, want = _run(model, x, lambda y: (y * w).sum() + y.square().sum(), conventional=True)
    model.disable_custom_gradient = False
    model.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    y = model(xg)
    kept: list[Tensor] = []
    if keep == "retain_grad":
        y.retain_grad()
    else:
        y.register_hook(kept.append)
    ((y * w).sum() + y.square().sum()).backward()
    seen = y.grad if keep == "retain_grad" else kept[0]
    assert (seen - (w + 2 * values)).abs().max().item() < 1e-12
    _assert_close([xg.grad] + [p.grad for p in model.parameters()], want)


def test_hook_on_the_engine_node_sees_the_intact_gradient() -> None:
    kwargs, shape = MODELS["2d"]
    model = _model(kwargs)
    y = model(_input(shape).requires_grad_(True))
    expected = 2 * y.detach().clone()
    seen: list[Tensor] = []
    y.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.append(grad_outputs[0]))
    y.square().sum().backward()  # autograd keeps the gradient for the hook: not taken
    assert torch.equal(seen[0], expected)


def test_gradient_kept_by_a_hook_of_a_dropped_output_raises() -> None:
    kwargs, shape = MODELS["2d"]
    model = _model(kwargs)
    y = model(_input(shape).requires_grad_(True))
    kept: list[Tensor] = []

    def replace(grad: Tensor) -> Tensor:
        kept.append(grad * 1)
        return kept[-1]

    y.register_hook(replace)
    loss = (2 * y).sum()
    del y  # the engine cannot see the hook any more: the gradient is taken
    loss.backward()
    # The error says which tensor was consumed: the incoming gradient, not the output.
    with pytest.raises(RuntimeError, match="this tensor is the incoming gradient"):
        kept[0].sum()


def test_explicit_gradient_is_left_intact() -> None:
    kwargs, shape = MODELS["2d"]
    model = _model(kwargs)
    x = _input(shape)
    g = torch.randn(shape, dtype=torch.float64)
    g_before = g.clone()
    _, want = _run(model, x, lambda y: (y * g).sum(), conventional=True)
    model.disable_custom_gradient = False
    model.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    model(xg).backward(g)
    assert torch.equal(g, g_before), "the caller's gradient was overwritten"
    _assert_close([xg.grad] + [p.grad for p in model.parameters()], want)


@pytest.mark.parametrize("share", [lambda y: y[:, :1], lambda y: y.detach(), lambda y: y.view(-1)],
                         ids=["slice", "detach", "view"])
def test_output_shared_before_backward_is_not_consumed(share: Callable) -> None:
    kwargs, shape = MODELS["2d"]
    model = _model(kwargs)
    x = _input(shape)
    loss_fn = _weighted(torch.Size(shape))
    values, want = _run(model, x, loss_fn, conventional=True)
    model.disable_custom_gradient = False
    model.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    y = model(xg)
    before = y.detach().clone()
    torch.testing.assert_close(before, values, rtol=1e-12, atol=1e-12)
    shared = share(y)
    loss_fn(y).backward()
    assert not isinstance(y, ConsumedTensor)
    assert torch.equal(y.detach(), before) and shared.numel() > 0
    _assert_close([xg.grad] + [p.grad for p in model.parameters()], want)


def test_autocast_output_is_a_copy_and_stays_readable() -> None:
    kwargs, shape = MODELS["2d"]
    torch.manual_seed(0)
    grads = []
    for consume in (False, True):
        torch.manual_seed(0)
        model = iUNet(verbose=0, consume_output=consume, **kwargs)
        x = _input(shape).float().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().mean().backward()
        assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
        grads.append([x.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- where it applies
def test_memcnn_backend_refuses_the_option() -> None:
    with pytest.raises(ValueError, match="consume_output=True needs me_backend='fused'"):
        iUNet(channels=(4, 8), architecture=(1, 1), dim=2, verbose=0, me_backend="memcnn",
              consume_output=True)
    with pytest.raises(TypeError, match="consume_output"):
        iUNet(channels=(4, 8), architecture=(1, 1), dim=2, verbose=0, consume_output=1)


def test_no_effect_without_the_fused_backward() -> None:
    kwargs, shape = MODELS["2d"]
    model = _model(kwargs)
    x = _input(shape)
    with torch.no_grad():
        y = model(x)
    # The fused forward normalises with its own kernel: equal up to rounding.
    assert type(y) is Tensor
    torch.testing.assert_close(model(x).detach(), y, rtol=1e-12, atol=1e-12)
    model.disable_custom_gradient = True
    y = model(x.clone().requires_grad_(True))
    y.square().sum().backward()
    assert type(y) is Tensor and torch.isfinite(y).all()


def test_taking_the_gradient_and_the_output_each_save_an_input_tensor_of_peak_memory() -> None:
    """By default the engine reuses an incoming gradient no one else can reach (ownership note 10):
    one input tensor less than when a hook on the output keeps it from doing so; the consuming
    mode also takes the output: one more."""
    from iunet_nb.measure.meter import measure_step

    x = torch.randn(1, 16, 128, 128)
    weights = torch.randn(1, 16, 128, 128)

    def weighted(y: torch.Tensor) -> torch.Tensor:
        # A loss whose own backward allocates nothing activation-sized but dy (square().mean()
        # peaks at 5 input tensors in PowBackward, above the engine's peak in consuming mode).
        return (y * weights).sum()

    def hooked(y: torch.Tensor) -> torch.Tensor:
        y.register_hook(lambda g: None)  # a hook could keep dy: it stays the caller's
        return weighted(y)

    overhead = {}
    for name, consume, loss_fn in [("kept", False, hooked), ("default", False, weighted),
                                   ("consuming", True, weighted)]:
        torch.manual_seed(0)
        model = iUNet(channels=(16, 32, 64), architecture=(1, 1, 1), dim=2, verbose=0,
                      consume_output=consume)
        overhead[name] = measure_step(model, x, loss_fn).activation_bytes / x.nbytes
    assert overhead["kept"] - overhead["default"] >= 0.9, overhead
    assert overhead["default"] - overhead["consuming"] >= 0.9, overhead

def test_default_mode_leaves_a_gradient_stored_by_a_hook_intact() -> None:
    """Without consume_output the engine reuses an incoming gradient only when no Python
    reference but autograd's call holds it: one stored by a hook of a dropped output is
    left as it is (ownership note 10), and the gradients are exact."""
    kwargs, shape = MODELS["2d"]
    model = _model(kwargs)
    model.consume_output = False
    x = _input(shape)
    _, want = _run(model, x, lambda y: (2 * y).sum(), conventional=True)
    model.disable_custom_gradient = False
    model.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    y = model(xg)
    kept: list[Tensor] = []
    y.register_hook(kept.append)
    loss = (2 * y).sum()
    del y
    loss.backward()
    assert type(kept[0]) is Tensor and torch.equal(kept[0], torch.full(shape, 2.0, dtype=torch.float64))
    _assert_close([xg.grad] + [p.grad for p in model.parameters()], want)


# ----------------------------------------------------------------------------- note 12
def _head(channels: int, dim: int, seed: int = 5) -> torch.nn.Module:
    torch.manual_seed(seed)
    return (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)[dim - 1](channels, 2, 3, padding=1).double()


def _headed_step(model: iUNet, head: torch.nn.Module, x: Tensor, conventional: bool,
                 backwards: int = 1) -> tuple[list[Tensor], Any]:
    """A step in which the caller keeps only the head's output; returns the gradients and
    the engine's autograd node (None for plain autograd)."""
    model.disable_custom_gradient = conventional
    model.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    body = model(xg)
    node = None if conventional else _engine_node(body)
    out = head(body)
    del body  # the caller keeps only the head's output
    loss = out.square().sum()
    for k in range(backwards):
        loss.backward(retain_graph=k + 1 < backwards)
    grads = [xg.grad] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                         for p in list(model.parameters()) + list(head.parameters())]
    return grads, node


def _engine_node(t: Tensor) -> Any:
    """The fused engine's autograd node behind ``t`` (through a crop, if any)."""
    node = t.grad_fn
    while node is not None and not hasattr(node, "consumed"):
        node = node.next_functions[0][0]
    assert node is not None, "no fused engine node"
    return node


@pytest.mark.parametrize("name", ["1d", "2d", "2d_cropped", "3d", "seed_2d"])
def test_default_mode_takes_an_output_no_one_can_reach(name: str) -> None:
    """Ownership note 12: followed by a layer whose output alone the caller keeps, the body's
    output is taken by the default mode's backward, and the gradients are exact."""
    kwargs, shape = MODELS[name]
    model = _model(kwargs)
    model.consume_output = False
    head = _head(kwargs["channels"][0], kwargs["dim"])
    x = _input(shape)
    want, _ = _headed_step(model, head, x, conventional=True)
    got, node = _headed_step(model, head, x, conventional=False)
    _assert_close(got, want)
    assert node.consumed, "the unreachable output was not taken"


class _Scale(torch.nn.Module):
    """A head whose backward does not need its input (nothing but the engine saves it)."""

    def forward(self, t: Tensor) -> Tensor:
        return 3.0 * t


@pytest.mark.parametrize("head_kind", ["conv", "scale"])
def test_default_mode_keeps_the_output_for_a_second_backward(head_kind: str) -> None:
    """With retain_graph=True the backward runs again from the output: the first backward
    leaves it (two backwards give exactly twice the gradients), the last one takes it."""
    kwargs, shape = MODELS["2d"]
    model = _model(kwargs)
    model.consume_output = False
    head = _head(kwargs["channels"][0], kwargs["dim"]) if head_kind == "conv" else _Scale()
    x = _input(shape)
    want, _ = _headed_step(model, head, x, conventional=True, backwards=2)
    got, node = _headed_step(model, head, x, conventional=False, backwards=2)
    _assert_close(got, want)
    assert node.consumed  # by the second backward, which does not keep the graph


def test_default_mode_leaves_an_output_the_caller_holds() -> None:
    kwargs, shape = MODELS["2d"]
    model = _model(kwargs)
    model.consume_output = False
    head = _head(kwargs["channels"][0], kwargs["dim"])
    body = model(_input(shape).requires_grad_(True))
    values = body.detach().clone()
    node = _engine_node(body)
    head(body).square().sum().backward()
    assert not node.consumed and type(body) is Tensor and torch.equal(body, values)


def test_default_mode_taking_the_output_saves_an_input_tensor_of_peak_memory() -> None:
    """Body + convolution, the caller keeping the convolution's output only: one input
    tensor less than when a forward hook keeps the body's output (ownership note 12)."""
    from iunet_nb.measure.meter import measure_step
    from iunet_nb.nn.conv import TiledConv

    x = torch.randn(1, 16, 128, 128)
    overhead = {}
    for keep in (True, False):
        torch.manual_seed(0)
        body = iUNet(channels=(16, 32, 64), architecture=(1, 1, 1), dim=2, verbose=0)
        kept: list[Tensor] = []
        if keep:
            body.register_forward_hook(lambda m, i, o: kept.append(o))
        model = torch.nn.Sequential(body, TiledConv(16, 1, dim=2))
        overhead[keep] = measure_step(model, x).activation_bytes / x.nbytes
    assert overhead[True] - overhead[False] >= 0.9, overhead


#: The volume benchmark's body (iunet_nb.measure.bench3d): its level-0 skip keeps 12 of 16
#: channels, so the level lives in one buffer whose room the coarser levels reuse (note 11).


@pytest.mark.slow
@settings(max_examples=30)
@example(case=VOLUME_BODY)
@given(case=cases())
def test_default_mode_with_a_dropped_output_equals_autograd_property(case: Case) -> None:
    """Default mode, the caller keeping only a head's output (nothing else saves the body's
    output, so the backward takes it: note 12): exact gradients for every configuration."""
    model = case.build()
    model.consume_output = False
    model.train()
    x = case.input(model)
    head = _Scale()
    grads, nodes = {}, {}
    for conventional in (True, False):
        torch.manual_seed(case.seed)  # the same dropout masks in both runs
        grads[conventional], nodes[conventional] = _headed_step(model, head, x, conventional)
    _assert_close(grads[False], grads[True])
    assert nodes[False].consumed
