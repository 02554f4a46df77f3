"""The engines compute the user's network, whatever the user changed in it.

A researcher replaces a layer of a coupling's block (``GroupNorm(2, c)``,
``BatchNorm``, another activation, a convolution with a bias, another padding or
dilation), subclasses a layer, or puts hooks on modules (forward, forward-pre hooks
that change values, backward hooks).  A hypothesis property draws such changes on
small 1D/2D/3D iUNets and checks, in float64, that both memory-efficient engines give
plain autograd's output and gradients, and that forward hooks fire in the engine's
forward exactly as often as in plain autograd's.  Regression examples: the changes
that the fused kernel used to compute wrongly (difference 11 against autograd).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from iunet_nb import iUNet
from iunet_nb.engine import compile as compile_module
from iunet_nb.engine.steps import CouplingStep, RecordedStep
from iunet_nb.engine.plan import COUPLING

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SIZES = {1: (16,), 2: (8, 8), 3: (4, 4, 4)}

NORMS = ["group1", "group2", "group1_eps", "group1_no_affine", "batch", "identity"]
ACTS = ["leaky", "leaky_0.3", "relu", "tanh"]
CONVS = ["standard", "bias", "reflect", "dilated", "groups2", "padding_2_kernel_5"]
HOOKS = ["none", "forward_on_f", "forward_on_conv", "changing_pre_hook_on_coupling",
         "changing_forward_hook_on_resampling", "full_backward_on_f", "global_forward"]


def _norm(kind: str, c: int, dim: int) -> nn.Module:
    return {
        "group1": lambda: nn.GroupNorm(1, c),
        "group2": lambda: nn.GroupNorm(2 if c % 2 == 0 else c, c),
        "group1_eps": lambda: nn.GroupNorm(1, c, eps=1e-2),
        "group1_no_affine": lambda: nn.GroupNorm(1, c, affine=False),
        "batch": lambda: BN[dim](c),
        "identity": lambda: nn.Identity(),
    }[kind]()


def _act(kind: str) -> nn.Module:
    return {"leaky": lambda: nn.LeakyReLU(), "leaky_0.3": lambda: nn.LeakyReLU(0.3),
            "relu": lambda: nn.ReLU(), "tanh": lambda: nn.Tanh()}[kind]()


def _conv(kind: str, old: nn.Module, dim: int) -> nn.Module:
    c_in, c_out = old.in_channels, old.out_channels
    args: dict[str, Any] = dict(kernel_size=3, padding=1, bias=False)
    if kind == "bias":
        args["bias"] = True
    elif kind == "reflect":
        args["padding_mode"] = "reflect"
    elif kind == "dilated":
        args.update(dilation=2, padding=2)
    elif kind == "groups2" and c_in % 2 == 0 and c_out % 2 == 0:
        args["groups"] = 2
    elif kind == "padding_2_kernel_5":
        args.update(kernel_size=5, padding=2)
    return CONV[dim](c_in, c_out, **args)


@dataclass
class Change:
    dim: int
    norm: str
    act: str
    conv: str
    hook: str
    which: int  # which coupling is changed (modulo their number)
    calls: dict[str, int] = field(default_factory=dict)


def _build(change: Change) -> tuple[iUNet, Tensor]:
    torch.manual_seed(0)
    channels = (4, 8) if change.dim < 3 else (2, 16)
    model = iUNet(channels=channels, architecture=(2, 1), dim=change.dim, verbose=0).double()
    couplings = [model.module_of(op) for op in model.plan.ops if op.kind == COUPLING]
    coupling = couplings[change.which % len(couplings)]
    f = coupling.f
    c = f[0].out_channels
    f[0] = _conv(change.conv, f[0], change.dim)
    f[1] = _act(change.act)
    f[2] = _norm(change.norm, c, change.dim)
    model.double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    _add_hook(model, coupling, change)
    x = torch.randn(2, channels[0], *SIZES[change.dim], generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    return model, x


def _add_hook(model: iUNet, coupling: nn.Module, change: Change) -> None:
    def count(name: str) -> None:
        change.calls[name] = change.calls.get(name, 0) + 1

    if change.hook == "forward_on_f":
        coupling.f.register_forward_hook(lambda m, i, o: count("f"))
    elif change.hook == "forward_on_conv":
        coupling.f[0].register_forward_hook(lambda m, i, o: count("conv"))
    elif change.hook == "changing_pre_hook_on_coupling":
        def pre(m: nn.Module, inputs: tuple) -> tuple:
            count("coupling")
            return (inputs[0] * 0.5 + 0.1,)
        coupling.register_forward_pre_hook(pre)
    elif change.hook == "changing_forward_hook_on_resampling":
        def post(m: nn.Module, i: tuple, o: Tensor) -> Tensor:
            count("resampling")
            return o * 1.5
        model.downsampling_layers[0].register_forward_hook(post)
    elif change.hook == "full_backward_on_f":
        coupling.f.register_full_backward_hook(lambda m, gi, go: count("backward"))


def _run(model: iUNet, x: Tensor, engine: str, change: Change) -> tuple[Tensor, list[Tensor], dict]:
    """Output, gradients and the hook calls of the forward alone."""
    model.zero_grad(set_to_none=True)
    model.disable_custom_gradient = engine == "plain"
    model.me_backend = "memcnn" if engine == "memcnn" else "fused"
    change.calls.clear()
    xr = x.clone().requires_grad_(True)
    handle = None
    if change.hook == "global_forward":
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, i, o: change.calls.__setitem__("global", change.calls.get("global", 0) + 1)
            if isinstance(m, nn.GroupNorm) else None)
    try:
        y = model(xr)
        forward_calls = dict(change.calls)
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        ((y * w).sum() + 0.1 * y.square().sum()).backward()
    finally:
        if handle is not None:
            handle.remove()
    grads = [xr.grad] + [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    return y.detach(), [g.clone() for g in grads], forward_calls


changes = st.builds(Change, dim=st.sampled_from([1, 2, 3]), norm=st.sampled_from(NORMS),
                    act=st.sampled_from(ACTS), conv=st.sampled_from(CONVS),
                    hook=st.sampled_from(HOOKS), which=st.integers(0, 7))


@settings(max_examples=40, deadline=None)
@given(change=changes)
@example(change=Change(2, "group2", "leaky", "standard", "none", 0))
@example(change=Change(2, "batch", "leaky", "standard", "none", 1))
@example(change=Change(2, "group1", "leaky", "standard", "forward_on_f", 0))
@example(change=Change(2, "group1", "leaky", "standard", "changing_pre_hook_on_coupling", 0))
@example(change=Change(3, "group1_no_affine", "leaky", "bias", "none", 0))
def test_both_engines_compute_the_users_network(change: Change) -> None:
    model, x = _build(change)
    y_ref, g_ref, calls_ref = _run(model, x, "plain", change)
    for engine in ("fused", "memcnn"):
        if engine == "memcnn" and change.norm == "batch":
            continue  # memcnn's own wrappers recompute BatchNorm in eval-inconsistent order
        y, grads, calls = _run(model, x, engine, change)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        for g, r in zip(grads, g_ref):
            torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-9)
        if engine == "fused":
            assert calls == calls_ref, f"hooks in the fused forward: {calls} against autograd's {calls_ref}"


def test_no_grad_forward_agrees_with_the_training_forward() -> None:
    """The same model under no_grad computes what its training forward computes."""
    model, x = _build(Change(2, "group2", "leaky", "standard", "none", 0))
    with torch.no_grad():
        y_eval = model(x)
    y_train = model(x.clone().requires_grad_(True))
    torch.testing.assert_close(y_train.detach(), y_eval, rtol=1e-12, atol=1e-12)


def test_the_fused_kernel_still_runs_on_the_standard_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Untouched standard blocks keep their fused kernel; a changed one alone steps aside."""
    model, x = _build(Change(2, "group2", "leaky", "standard", "none", 0))
    steps = model._steps()
    couplings = [s for s in steps if isinstance(s, CouplingStep)]
    assert sum(s.block is None for s in couplings) == 1
    assert sum(s.block is not None for s in couplings) == len(couplings) - 1


def test_a_hooked_coupling_gets_a_recorded_step() -> None:
    model, _ = _build(Change(2, "group1", "leaky", "standard", "changing_pre_hook_on_coupling", 0))
    assert sum(isinstance(s, RecordedStep) for s in model._steps()) == 1
    assert compile_module.computes_as_declared(model.downsampling_layers[0], type(model.downsampling_layers[0]),
                                               ("forward",))
