"""Compilers, tracers and mixed precision around the memory-efficient engines.

* ``torch.compile(model)`` (default inductor backend) trains with plain autograd's
  gradients in float32 and float64: it compiles around the engine, which runs eagerly.
* Compiled autograd traces the backward; the engine's backward runs as it is there.
* ``torch.jit.trace`` of a training forward and ``torch.jit.script`` raise errors that
  name what works instead; tracing an eval model under ``no_grad`` works.
* The memcnn engine under CPU bfloat16 autocast runs (in the parameters' dtype, as the
  fused engine) instead of crashing in torch's convolution.
* ``decode`` with codes of mismatched sizes names the code and the expected shape.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch import Tensor

from iunet_nb import iUNet

torch.set_num_threads(1)

ENGINES = {"fused": dict(me_backend="fused"), "memcnn": dict(me_backend="memcnn")}

#: torch.compile's default backend (inductor) generates C++ on CPU and needs a compiler.
needs_cxx = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None,
    reason="torch.compile's inductor backend needs a C++ compiler on CPU (none on PATH; set CXX)")


def _model(engine: str, dtype: torch.dtype, **extra) -> iUNet:
    torch.manual_seed(0)
    model = iUNet(channels=(4, 8, 16), architecture=(2, 1, 1), dim=2, verbose=0,
                  **ENGINES[engine], **extra).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _input(dtype: torch.dtype) -> Tensor:
    return torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _gradients(run: torch.nn.Module, params: torch.nn.Module, x: Tensor) -> list[Tensor]:
    params.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    run(xr).square().mean().backward()  # the loss a user writes
    return [xr.grad] + [p.grad.clone() for p in params.parameters()]


def _plain_gradients(model: iUNet, x: Tensor) -> list[Tensor]:
    model.disable_custom_gradient = True
    try:
        return _gradients(model, model, x)
    finally:
        model.disable_custom_gradient = False


def _close(a: list[Tensor], b: list[Tensor], dtype: torch.dtype) -> None:
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    for g, r in zip(a, b):
        torch.testing.assert_close(g, r, **tol)


@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_torch_compile_trains_with_plain_autograds_gradients(engine: str, dtype: torch.dtype) -> None:
    torch._dynamo.reset()
    model, x = _model(engine, dtype), _input(dtype)
    reference = _plain_gradients(model, x)
    compiled = torch.compile(model)
    for _ in range(2):  # the second call runs the compiled code
        _close(_gradients(compiled, model, x), reference, dtype)


@pytest.mark.slow
@needs_cxx
def test_compiled_autograd_runs_the_engines_backward() -> None:
    torch._dynamo.reset()
    model, x = _model("fused", torch.float64), _input(torch.float64)
    reference = _plain_gradients(model, x)
    compiled = torch.compile(model)
    from torch._dynamo import compiled_autograd

    with compiled_autograd._enable(torch.compile(backend="eager")):
        grads = _gradients(compiled, model, x)
    _close(grads, reference, torch.float64)


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_jit_trace_of_a_training_forward_names_what_works(engine: str) -> None:
    model, x = _model(engine, torch.float32), _input(torch.float32).requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"torch\.no_grad\(\).*disable_custom_gradient"):
        torch.jit.trace(model, x)


def test_jit_trace_of_an_eval_model_under_no_grad_works() -> None:
    model, x = _model("fused", torch.float32).eval(), _input(torch.float32)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), model(x))


def test_jit_script_names_what_works() -> None:
    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace\(model\.eval\(\), x\)"):
        torch.jit.script(_model("fused", torch.float32))


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_bf16_autocast_trains_with_both_engines(engine: str) -> None:
    """Under CPU bf16 autocast both engines run the body in the parameters' dtype (an exact
    inverse needs it) and return bfloat16: the gradients are those of plain autograd through
    the float32 body followed by a cast of its output to bfloat16."""
    model, x = _model(engine, torch.float32), _input(torch.float32)

    def grads(autocast: bool) -> tuple[Tensor, list[Tensor]]:
        model.disable_custom_gradient = not autocast
        model.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(xr)
        y = y if autocast else y.to(torch.bfloat16)
        y.float().square().mean().backward()
        return y, [xr.grad] + [p.grad.clone() for p in model.parameters()]

    y, got = grads(True)
    y_ref, ref = grads(False)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-6)


def test_decode_names_the_code_of_the_wrong_size() -> None:
    model = _model("fused", torch.float32)
    codes = list(model.encode(_input(torch.float32)))
    codes[1] = codes[1][..., :-1]
    with pytest.raises(ValueError, match=r"code 1 has shape \(2, 4, 6, 5\).*must be \(2, 4, 6, 6\)"):
        model.decode(*codes)
    codes = list(model.encode(_input(torch.float32)))
    codes[2] = codes[2][:1]
    with pytest.raises(ValueError, match=r"code 2 has shape \(1, "):
        model.decode(*codes)
