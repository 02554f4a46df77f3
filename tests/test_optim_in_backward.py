"""The optimizer step inside the backward (iunet_nb.engine.optim_in_backward): the same numbers as
``backward(); step()`` for every engine, and the gradients never all alive at once."""
from __future__ import annotations

import copy

import pytest
import torch

from iunet_nb import iUNet
from iunet_nb.measure.meter import measure_step
from iunet_nb.engine.optim_in_backward import OptimizerInBackward, optimizer_in_backward

torch.set_num_threads(1)

ENGINES = {
    "conventional": dict(disable_custom_gradient=True),
    "fused": dict(me_backend="fused"),
    "memcnn": dict(me_backend="memcnn"),
}
OPTS = {
    "sgd": dict(lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adamw": dict(lr=1e-2, weight_decay=1e-2),
    "adam": dict(lr=1e-2),
}


def _model(engine: str, dtype=torch.float64) -> iUNet:
    torch.manual_seed(0)
    m = iUNet(channels=(4, 8, 16), architecture=(2, 1, 2), dim=2, verbose=0, **ENGINES[engine])
    m = m.to(dtype)
    with torch.no_grad():  # off the initialisation, so that every parameter matters
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def _loss(model, x, target):
    return (model(x) - target).square().mean()


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 4, 16, 16, generator=g, dtype=dtype),
             torch.randn(2, 4, 16, 16, generator=g, dtype=dtype)) for _ in range(3)]


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_same_parameters_as_backward_then_step(engine: str, name: str) -> None:
    ref, model = _model(engine), _model(engine)
    cls = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
    opt = cls(ref.parameters(), **OPTS[name])
    with optimizer_in_backward(model, name, **OPTS[name]) as inb:
        for x, target in _data():
            opt.zero_grad(set_to_none=True)
            _loss(ref, x, target).backward()
            opt.step()
            _loss(model, x, target).backward()
            assert all(p.grad is None for p in model.parameters())  # applied and freed
    n = sum(1 for _ in model.parameters())
    assert inb.steps == 3 * n  # each parameter updated exactly once per backward
    for (name_p, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13, msg=name_p)
        assert not torch.equal(a, _model(engine).state_dict()[name_p])  # it did train


def test_clip_value_equals_clip_grad_value() -> None:
    ref, model = _model("fused"), _model("fused")
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    inb = optimizer_in_backward(model, "sgd", lr=0.1, clip_value=1e-3)
    for x, target in _data():
        opt.zero_grad(set_to_none=True)
        _loss(ref, x, target).backward()
        torch.nn.utils.clip_grad_value_(ref.parameters(), 1e-3)
        opt.step()
        _loss(model, x, target).backward()
    inb.remove()
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13)
    # removed: the next backward leaves gradients as usual
    x, target = _data()[0]
    _loss(model, x, target).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_arguments() -> None:
    model = _model("fused")
    with pytest.raises(ValueError, match="max_norm: gradient-norm clipping needs every gradient"):
        optimizer_in_backward(model, "sgd", lr=0.1, max_norm=1.0)
    with pytest.raises(ValueError, match="optimizer='lbfgs'"):
        optimizer_in_backward(model, "lbfgs", lr=0.1)
    with pytest.raises(ValueError, match="lr: SGD needs"):
        optimizer_in_backward(model, "sgd")
    with pytest.raises(ValueError, match="clip_value"):
        optimizer_in_backward(model, "sgd", lr=0.1, clip_value=-1)
    inb = optimizer_in_backward(model.parameters(), torch.optim.Adam, lr=1e-3)
    assert isinstance(inb, OptimizerInBackward) and "Adam" in repr(inb)
    inb.set_lr(1e-4)
    assert all(g["lr"] == 1e-4 for o in inb.optimizers.values() for g in o.param_groups)
    inb.remove()


def test_gradients_never_all_alive_in_the_fused_engine() -> None:
    """With the update in the backward, the step peak drops by about the gradients' bytes."""
    torch.manual_seed(0)
    model = iUNet(channels=(32, 64, 128), architecture=(3, 3, 3), dim=2, verbose=0)
    x = torch.randn(1, 32, 16, 16)
    plain = measure_step(copy.deepcopy(model), x)
    with optimizer_in_backward(model, "sgd", lr=1e-3):
        inb = measure_step(model, x)
    assert inb.grad_bytes == 0  # every gradient applied and freed
    assert plain.grad_bytes > 0.5 * plain.peak_bytes  # the weights dominate this small model
    # the peak loses most of the gradients (what remains: one step's gradients + temporaries)
    assert inb.peak_bytes < plain.peak_bytes - 0.6 * plain.grad_bytes, (inb.peak_bytes, plain.peak_bytes)


# ------------------------------------------------------------------ only what autograd accumulates
def _snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("how", ["autograd.grad", "backward(inputs=)"])
def test_an_input_gradient_alone_steps_no_parameter(engine: str, how: str) -> None:
    """Adversarial examples, saliency maps, the first half of a gradient penalty: only dL/dx is
    asked for, so autograd accumulates no parameter gradient and nothing may be stepped."""
    model, ref = _model(engine), _model("conventional")
    (x, target), = _data()[:1]
    before = _snapshot(model)
    with optimizer_in_backward(model, "sgd", lr=0.1) as inb:
        xr = x.clone().requires_grad_(True)
        loss = _loss(model, xr, target)
        if engine == "memcnn":  # memcnn refuses both itself, with an error that names backward()
            with pytest.raises(RuntimeError, match=r"not compatible with \.grad\(\)"):
                if how == "autograd.grad":
                    torch.autograd.grad(loss, [xr])
                else:
                    loss.backward(inputs=[xr])
            dx = None
        elif how == "autograd.grad":
            (dx,) = torch.autograd.grad(loss, [xr])
        else:
            loss.backward(inputs=[xr])
            dx = xr.grad
    assert inb.steps == 0
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    if dx is not None:
        xr_ref = x.clone().requires_grad_(True)
        (dx_ref,) = torch.autograd.grad(_loss(ref, xr_ref, target), [xr_ref])
        torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_frozen_parameters_are_not_stepped(engine: str) -> None:
    model, ref = _model(engine), _model(engine)
    frozen = [n for n, _ in model.named_parameters()][::3]
    for m in (model, ref):
        for n, p in m.named_parameters():
            p.requires_grad_(n not in frozen)
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.05)
    (x, target), = _data()[:1]
    _loss(ref, x, target).backward()
    opt.step()
    with optimizer_in_backward([p for p in model.parameters() if p.requires_grad], "sgd", lr=0.05):
        _loss(model, x, target).backward()
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13, msg=n)


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_two_forwards_then_two_backwards_are_refused_as_by_autograd(engine: str) -> None:
    """The first backward steps the parameters in place; the second forward's backward would
    then use parameters other than its forward's.  Plain autograd refuses; so does every engine."""
    model = _model(engine)
    (x1, t1), (x2, t2) = _data()[:2]
    with optimizer_in_backward(model, "sgd", lr=0.05):
        loss1, loss2 = _loss(model, x1, t1), _loss(model, x2, t2)
        loss1.backward()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss2.backward()
