"""The engines on a CUDA GPU (every test is marked ``cuda``: skipped without CUDA, see conftest.py).

Run with ``pytest -m cuda -q tests/test_cuda.py`` (``benchmarks/gpu_check.sh`` does). Checked:

* RNG replay on the device: a recomputation draws the forward's CUDA numbers and leaves the
  caller's CUDA generator as it was (:class:`~iunet_nb.engine.steps.RecomputeContext`);
* a small hypothesis profile (:data:`GPU_EXAMPLES` examples, derandomized) of the float64
  gradient property of ``tests/test_properties.py``: the fused and memcnn engines equal plain
  autograd on CUDA (outputs, input and every parameter gradient within 1e-10 relative);
* the consuming mode (``consume_output=True``): exact gradients, the output consumed, and
  about one input tensor of peak memory saved per taken tensor (output, gradient);
* the optimizer in the backward: the same parameters as ``backward(); step()``, and the
  step peak loses most of the gradients' bytes;
* the step's memory from the CUDA allocator (``measure_step(device='cuda')``, i.e.
  ``torch.cuda.max_memory_allocated``) against ``predict_step_memory`` for the Table 1 model
  at 512^2, delta = 5, within :data:`PREDICTOR_TOLERANCE_CUDA`.

Nothing needs the network or files outside the tree; memcnn is optional (its cases are
skipped, with the fix, when it cannot be imported).
"""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from torch import Tensor

from iunet_nb import iUNet
from iunet_nb.engine import ConsumedTensor
from iunet_nb.engine.optim_in_backward import optimizer_in_backward
from iunet_nb.engine.steps import RecomputeContext
from iunet_nb.measure.meter import measure_step
from test_consuming import MODELS, _model as _consuming_model
from test_properties import KEPT_LT_SENT, SEED_2D, SEED_3D, Case, cases

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
#: examples per engine of the gradient property on the GPU (plus the explicit ones)
GPU_EXAMPLES = 15
#: |predicted / measured - 1| allowed for the step peak and the total on CUDA.  The predictor
#: is calibrated on the CPU (15 % there, tests/test_predict.py): its weight-sized oneDNN
#: temporaries do not exist on the GPU, cuDNN's workspaces take their place.
PREDICTOR_TOLERANCE_CUDA = 0.25

_GPU_PROFILE = settings(max_examples=GPU_EXAMPLES, derandomize=True, deadline=None, database=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                               HealthCheck.filter_too_much])


def _memcnn_missing() -> str | None:
    """Why the memcnn engine cannot run here (None: it can)."""
    try:
        from iunet_nb.engine.memcnn import import_memcnn

        import_memcnn()
    except Exception as err:  # noqa: BLE001 - any failure means: not usable
        return (f"memcnn not importable ({type(err).__name__}: {err}); put its wheel in .whl/ "
                "(pip download --no-deps memcnn==1.5.2 -d .whl) and run benchmarks/gpu_check.sh")
    return None


ENGINES = ["fused", pytest.param("memcnn", marks=pytest.mark.skipif(
    _memcnn_missing() is not None, reason=str(_memcnn_missing())))]


# ----------------------------------------------------------------------------- RNG replay
def test_recompute_context_replays_the_cuda_generator() -> None:
    torch.manual_seed(5)
    x = torch.zeros(4, device=DEVICE)
    record = RecomputeContext.capture(torch.nn.Dropout(), x, preserve_rng_state=True)
    assert record["rng_device"] == x.device
    forward_draw = torch.rand(64, device=DEVICE)
    after = torch.cuda.get_rng_state(x.device)
    with RecomputeContext(torch.nn.Dropout(), record, preserve_rng_state=True):
        replay = torch.rand(64, device=DEVICE)
    assert torch.equal(replay, forward_draw)
    assert torch.equal(torch.cuda.get_rng_state(x.device), after), "the caller's CUDA generator moved"


# ----------------------------------------------------------------------------- gradient property
def _gradients(model: iUNet, x: Tensor, weight: Tensor, seed: int) -> list[Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # seeds the CUDA generator too: the same dropout masks in every engine
    y = model(x)
    (y * weight).sum().backward()
    return [y.detach(), x.grad] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                   for p in model.parameters()]


@pytest.mark.parametrize("engine", ENGINES)
@_GPU_PROFILE
@example(case=SEED_2D)
@example(case=SEED_3D)
@example(case=KEPT_LT_SENT)
@given(case=cases())
def test_engine_gradients_equal_autograd_on_cuda(engine: str, case: Case) -> None:
    model = case.build().to(DEVICE).train()
    x = case.input(model).to(DEVICE)
    x_before = x.clone()
    with torch.no_grad():
        shape = model(x).shape
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(case.seed + 3),
                         dtype=x.dtype).to(DEVICE)
    model.disable_custom_gradient = True
    want = _gradients(model, x, weight, case.seed)
    model.disable_custom_gradient = False
    model.me_backend = engine
    got = _gradients(model, x, weight, case.seed)
    assert torch.equal(x, x_before), "the caller's input was modified"
    assert all(g.device.type == "cuda" for g in got), "a result left the GPU"
    scale = max(1.0, max(g.abs().max().item() for g in want[1:]))
    names = ["output", "input grad"] + [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, want, got):
        ref = max(1.0, a.abs().max().item()) if name == "output" else scale
        err = (a - b).abs().max().item() / ref
        assert err <= 1e-10, f"{engine} on CUDA: {name} differs from autograd by {err:.3g} (relative)"


# ----------------------------------------------------------------------------- consuming mode
def _weighted_on(shape: torch.Size, seed: int = 3, dtype: torch.dtype = torch.float64
                 ) -> Callable[[Tensor], Tensor]:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(DEVICE)
    return lambda y: (y * w).sum()


def _step(model: iUNet, x: Tensor, loss_fn: Callable[[Tensor], Tensor], conventional: bool,
          seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    """``(output, [dL/dx] + parameter gradients)`` of one step (the output may be consumed)."""
    model.disable_custom_gradient = conventional
    model.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = model(xg)
    loss_fn(y).backward()
    return y, [xg.grad] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                           for p in model.parameters()]


@pytest.mark.parametrize("name", ["2d", "3d", "2d_cropped", "user_block", "seed_2d"])
def test_consuming_mode_gradients_equal_autograd_on_cuda(name: str) -> None:
    kwargs, shape = MODELS[name]
    model = _consuming_model(kwargs).to(DEVICE).train()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    x_before = x.clone()
    with torch.no_grad():
        loss_fn = _weighted_on(model(x).shape)
    y, got = _step(model, x, loss_fn, conventional=False)
    _, want = _step(model, x, loss_fn, conventional=True)
    scale = max(1.0, max(g.abs().max().item() for g in want))
    for i, (a, b) in enumerate(zip(got, want)):
        err = (a - b).abs().max().item() / scale
        assert err <= 1e-10, f"gradient {i} differs from autograd by {err:.3g} (relative)"
    assert isinstance(y, ConsumedTensor), "the output was not taken over"
    assert torch.equal(x, x_before), "the caller's input was modified"


def test_consuming_mode_saves_input_tensors_of_cuda_memory() -> None:
    """As tests/test_consuming.py on the CPU: reusing the gradient and taking the output each
    save about one input tensor of the allocator's peak (0.75 allowed here: cuDNN workspaces,
    the same in every run, may shift where the peak is reached)."""
    x = torch.randn(1, 16, 256, 256).to(DEVICE)
    loss = _weighted_on(x.shape, dtype=torch.float32)

    def hooked(y: Tensor) -> Tensor:
        y.register_hook(lambda g: None)  # a hook could keep dy: the engine leaves it alone
        return loss(y)

    overhead = {}
    for name, consume, loss_fn in [("kept", False, hooked), ("default", False, loss),
                                   ("consuming", True, loss)]:
        torch.manual_seed(0)
        model = iUNet(channels=(16, 32, 64), architecture=(1, 1, 1), dim=2, verbose=0,
                      consume_output=consume).to(DEVICE)
        m = measure_step(model, x, loss_fn, device=DEVICE)
        assert m.meter == "cuda"
        overhead[name] = m.activation_bytes / x.nbytes
    assert overhead["kept"] - overhead["default"] >= 0.75, overhead
    assert overhead["default"] - overhead["consuming"] >= 0.75, overhead


# ----------------------------------------------------------------------------- optimizer in backward
def _small_model(engine: str) -> iUNet:
    torch.manual_seed(0)
    extra = dict(disable_custom_gradient=True) if engine == "conventional" else dict(me_backend=engine)
    m = iUNet(channels=(4, 8, 16), architecture=(2, 1, 2), dim=2, verbose=0, **extra).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.to(DEVICE)


@pytest.mark.parametrize("engine", ["fused", "conventional"])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_in_backward_equals_backward_then_step_on_cuda(engine: str, name: str) -> None:
    kwargs = {"sgd": dict(lr=0.05, momentum=0.9, weight_decay=1e-3),
              "adamw": dict(lr=1e-2, weight_decay=1e-2)}[name]
    ref, model = _small_model(engine), _small_model(engine)
    opt = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name](ref.parameters(), **kwargs)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64).to(DEVICE),
             torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64).to(DEVICE)) for _ in range(3)]
    with optimizer_in_backward(model, name, **kwargs) as inb:
        for x, target in data:
            opt.zero_grad(set_to_none=True)
            (ref(x) - target).square().mean().backward()
            opt.step()
            (model(x) - target).square().mean().backward()
            assert all(p.grad is None for p in model.parameters())  # applied and freed
    assert inb.steps == 3 * sum(1 for _ in model.parameters())
    for (pname, a), b in zip(ref.named_parameters(), model.parameters()):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13, msg=pname)


def test_optimizer_in_backward_frees_the_gradients_in_cuda_memory() -> None:
    torch.manual_seed(0)
    model = iUNet(channels=(32, 64, 128), architecture=(3, 3, 3), dim=2, verbose=0).to(DEVICE)
    x = torch.randn(1, 32, 16, 16).to(DEVICE)
    plain = measure_step(copy.deepcopy(model), x, device=DEVICE)
    with optimizer_in_backward(model, "sgd", lr=1e-3):
        inb = measure_step(model, x, device=DEVICE)
    assert inb.grad_bytes == 0
    assert plain.grad_bytes > 0.5 * plain.peak_bytes  # the weights dominate this small model
    assert inb.peak_bytes < plain.peak_bytes - 0.6 * plain.grad_bytes, (inb.peak_bytes, plain.peak_bytes)


# ----------------------------------------------------------------------------- meter vs predictor
@pytest.mark.parametrize("mode", ["conventional", "fused"])
def test_cuda_allocator_peak_against_the_predictor(mode: str) -> None:
    from iunet_nb.arch.layout import compute_layout
    from iunet_nb.measure.bench import CHANNELS, build_model
    from iunet_nb.measure.predict import predict_step_memory

    size, delta = 512, 5
    model = build_model(mode, delta, device=DEVICE)
    x = torch.randn(1, CHANNELS[0], size, size, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch.cuda.empty_cache()
    m = measure_step(model, x, device=DEVICE)
    assert m.meter == "cuda" and m.device.startswith("cuda")
    p = predict_step_memory(compute_layout(CHANNELS, [delta] * 5, 2), tuple(x.shape), "float32", mode)
    assert p.parameters == m.param_bytes
    err_step = p.peak_step / m.peak_bytes - 1
    err_total = p.total / m.total_bytes - 1
    detail = (f"{mode} {size}^2 delta={delta} on {torch.cuda.get_device_name()}: predicted step "
              f"{p.peak_step / 2**20:.1f} MiB vs max_memory_allocated {m.peak_bytes / 2**20:.1f} MiB "
              f"({100 * err_step:+.1f} %), total {100 * err_total:+.1f} %")
    print(detail)
    assert abs(err_step) <= PREDICTOR_TOLERANCE_CUDA and abs(err_total) <= PREDICTOR_TOLERANCE_CUDA, detail
