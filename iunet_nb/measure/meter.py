"""Memory and time meters for one training step (forward + loss + backward).

(:func:`measure_forward` applies the same meters to one inference forward
under ``torch.no_grad()``.)

Two meters, chosen by the device of the input:

``'cuda'``
    The CUDA caching allocator's own statistics: ``max_memory_allocated()``
    after ``reset_peak_memory_stats()``, relative to ``memory_allocated()``
    just before the step.

``'cpu-profiler'``
    PyTorch's CPU allocator reports every allocation and every free to the
    profiler when ``profile_memory=True``.  The raw ``[memory]`` instant
    events (``prof.profiler.kineto_results.events()``; each has a signed
    ``nbytes()`` and a nanosecond timestamp) are summed in time order, which
    gives the allocator's running total relative to the state before the step
    and therefore its peak.  ``prof.events()`` / ``key_averages()`` are *not*
    usable for this: they fold allocations into the op that made them.
    Storages released by ``tensor.storage().resize_(0)`` (as memcnn does) show
    up as free events and are therefore seen.

Caveats of the CPU meter:

* Memory that oneDNN / MKL allocate outside torch's allocator (convolution
  scratch pads, reordered weights) is invisible to it.  :func:`peak_rss_of`
  measures the peak resident set size of a fresh process as a cross-check.
* The profiler slows the step down, so ``StepMeasurement.seconds`` includes
  profiler overhead.  Use :func:`time_step` for timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from iunet_nb.engine.optim_in_backward import OptimizerInBackward

__all__ = [
    "StepMeasurement",
    "measure_step",
    "ForwardMeasurement",
    "measure_forward",
    "time_step",
    "optimizer_state_bytes",
    "peak_rss_of",
    "default_loss",
    "mean_square",
]

LossFn = Callable[[Any], torch.Tensor]


@dataclass
class StepMeasurement:
    """Memory and time of one training step; all byte counts are in bytes.

    Attributes:
        peak_bytes: peak allocator total during the step minus the total just
            before it (activations, temporaries and newly allocated gradients).
        param_bytes: bytes of the model's parameters (resident before the step).
        grad_bytes: bytes of parameter ``.grad`` tensors allocated by the step.
        activation_bytes: ``peak_bytes - grad_bytes``: activations and
            temporaries (exact when all gradients are alive at the peak, which
            is the usual case: the peak is reached late in the backward).
        end_bytes: allocator total after the step (output and loss released)
            minus the total before it; normally equal to ``grad_bytes``.
        input_bytes: bytes of the input tensor.
        seconds: wall time of forward + loss + backward (for the CPU meter this
            includes the profiler's overhead; see :func:`time_step`).
        device: device the step ran on, e.g. ``'cpu'`` or ``'cuda:0'``.
        meter: ``'cpu-profiler'`` or ``'cuda'``.
        state_bytes: bytes of optimizer state created by the step (e.g. Adam's
            moments on its first step; 0 without an optimizer); included in
            ``peak_bytes`` and left out of ``activation_bytes``.
    """

    peak_bytes: int
    param_bytes: int
    grad_bytes: int
    activation_bytes: int
    end_bytes: int
    input_bytes: int
    seconds: float
    device: str
    meter: str
    state_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """Parameters + input + step peak: the memory a training step needs
        at its peak, excluding optimizer state and framework overhead."""
        return self.param_bytes + self.input_bytes + self.peak_bytes


class _MeanSquare(torch.autograd.Function):
    """``mean(y^2)`` whose backward allocates only its gradient ``2 y g / numel``.

    torch's ``y.square().mean()`` keeps three activation-sized temporaries in its
    backward (``PowBackward0``: 5 output-sized tensors at its peak), which is a cost of
    the benchmark's loss, not of the network it measures.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(y)
        flat = y.reshape(-1)
        return torch.dot(flat, flat) / flat.numel()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return y * (grad * (2.0 / y.numel()))


def mean_square(y: torch.Tensor) -> torch.Tensor:
    """``y.square().mean()`` (a scalar) with a backward that allocates nothing but ``dL/dy``."""
    return _MeanSquare.apply(y)


def default_loss(output: Any) -> torch.Tensor:
    """A scalar loss for any output: the sum over its tensors of
    ``mean_square(t.float())`` (the mean of the squares; tuples and lists are flattened)."""
    tensors = _tensors_of(output)
    if not tensors:
        raise TypeError(f"model output contains no tensor: {type(output).__name__}")
    loss = mean_square(tensors[0].float())
    for t in tensors[1:]:
        loss = loss + mean_square(t.float())
    return loss


def _tensors_of(output: Any) -> list[torch.Tensor]:
    """The tensors in a (possibly nested) tuple/list output, in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors_of(item)]
    return []


def _parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())


def _run_step(model: nn.Module, x: torch.Tensor, loss_fn: Optional[LossFn],
              optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Forward, loss, backward (and ``optimizer.step()``); output and loss released on return."""
    y = model(x)
    loss = (loss_fn or default_loss)(y)
    loss.backward()
    del y, loss
    if optimizer is not None:
        optimizer.step()


def _check_device(x: torch.Tensor, device: Optional[Union[str, torch.device]]) -> torch.device:
    """The device to measure on (default: ``x.device``); a ``ValueError`` naming ``device``
    if there is no meter for it.  Touches nothing."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    try:
        dev = torch.device(device) if device is not None else x.device
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a device: use 'cpu' or 'cuda' ({err})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(
            f"device={str(dev)!r}: there is a memory meter only for 'cpu' (the allocator's "
            f"events through the profiler) and 'cuda'"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(dev)!r} but CUDA is not available: use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _devices_of(model: nn.Module) -> list[tuple[torch.Tensor, torch.device]]:
    return [(t, t.device) for t in list(model.parameters()) + list(model.buffers())]


def _profiler_running_total(prof: torch.profiler.profile) -> tuple[int, int]:
    """(peak, end) of the running sum of the raw CPU ``[memory]`` events."""
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda ev: ev[0])  # stable: ties keep the recorded order
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak, total


def measure_step(
    model: nn.Module,
    x: torch.Tensor,
    loss_fn: Optional[LossFn] = None,
    *,
    device: Optional[Union[str, torch.device]] = None,
    set_grads_to_none: bool = True,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> StepMeasurement:
    """Measure the memory and time of one training step.

    The step is ``y = model(x)``, ``loss = loss_fn(y)`` (default:
    :func:`default_loss`), ``loss.backward()``.  The model and input are moved
    to ``device`` (default: the device of ``x``); note that ``model.to`` acts
    in place.  With ``set_grads_to_none`` the parameters' ``.grad`` are set to
    ``None`` first, so that their allocation is counted in the step.

    On CPU the allocator's running total is reconstructed from the profiler's
    raw memory events; on CUDA the caching allocator's statistics are used.
    The gradients stay in the parameters' ``.grad`` afterwards.

    ``optimizer`` (optional): a ``torch.optim.Optimizer`` whose ``step()``
    follows the backward inside the measured step, so that the peak includes
    the update and any state the optimizer creates (Adam's moments on its
    first step); the gradients are kept.  For an update applied during
    the backward (:mod:`iunet_nb.engine.optim_in_backward`) nothing is needed here.

    The device is checked before anything is touched: for a device without a
    meter (e.g. ``'meta'``) a ``ValueError`` is raised and the model is left
    where it was.  If the step fails, the model is moved back to its original
    devices and its parameters' ``.grad`` are restored before the error
    propagates.
    """
    dev = _check_device(x, device)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    origin = _devices_of(model)
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        return _measure(model, x.to(dev), dev, loss_fn, set_grads_to_none, optimizer)
    except BaseException:
        if any(t.device != d for t, d in origin):
            for t, d in origin:  # undo model.to(dev), tensor by tensor
                if t.device != d:
                    t.data = t.data.to(d)
        for p, g in grads:  # the gradients the caller had (set to None for the step)
            p.grad = g
        raise


def _measure(model: nn.Module, x: torch.Tensor, dev: torch.device, loss_fn: Optional[LossFn],
             set_grads_to_none: bool, optimizer: Optional[torch.optim.Optimizer]
             ) -> StepMeasurement:
    model.to(dev)
    params = _parameters(model)
    if set_grads_to_none:
        for p in params:
            p.grad = None
    had_grad = {id(p) for p in params if p.grad is not None}
    param_bytes = sum(p.nbytes for p in params)
    state_before = optimizer_state_bytes(optimizer)

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        start = time.perf_counter()
        _run_step(model, x, loss_fn, optimizer)
        torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(dev) - base
        end = torch.cuda.memory_allocated(dev) - base
        meter = "cuda"
    elif dev.type == "cpu":
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            start = time.perf_counter()
            _run_step(model, x, loss_fn, optimizer)
            seconds = time.perf_counter() - start
        peak, end = _profiler_running_total(prof)
        meter = "cpu-profiler"
    else:
        raise ValueError(f"no memory meter for device type {dev.type!r}")

    grad_bytes = sum(
        p.grad.nbytes for p in params if p.grad is not None and id(p) not in had_grad
    )
    state_bytes = optimizer_state_bytes(optimizer) - state_before
    return StepMeasurement(
        peak_bytes=peak,
        param_bytes=param_bytes,
        grad_bytes=grad_bytes,
        activation_bytes=peak - grad_bytes - state_bytes,
        state_bytes=state_bytes,
        end_bytes=end,
        input_bytes=x.nbytes,
        seconds=seconds,
        device=str(dev),
        meter=meter,
    )


@dataclass
class ForwardMeasurement:
    """Memory and time of one inference forward (``torch.no_grad()``); byte counts in bytes.

    Attributes:
        peak_bytes: peak allocator total during the forward minus the total
            just before it (activations, temporaries and the output).
        param_bytes: bytes of the model's parameters (resident before).
        input_bytes: bytes of the input tensor.
        output_bytes: bytes of the output tensor(s), alive after the forward.
        seconds: wall time (with the CPU meter, including profiler overhead).
        device, meter: as in :class:`StepMeasurement`.
    """

    peak_bytes: int
    param_bytes: int
    input_bytes: int
    output_bytes: int
    seconds: float
    device: str
    meter: str

    @property
    def total_bytes(self) -> int:
        """Parameters + input + forward peak: what inference needs at its peak."""
        return self.param_bytes + self.input_bytes + self.peak_bytes


def measure_forward(model: nn.Module, x: torch.Tensor, *,
                    device: Optional[Union[str, torch.device]] = None) -> tuple[Any, ForwardMeasurement]:
    """Run ``model(x)`` under ``torch.no_grad()`` and measure its memory with the step meters.

    The same meters as :func:`measure_step` (CPU: the profiler's raw allocator
    events; CUDA: the caching allocator's peak), for a forward alone, without
    a graph.  The model and input are moved to ``device`` (default: the
    device of ``x``; ``model.to`` acts in place).  Returns
    ``(output, ForwardMeasurement)``.
    """
    dev = _check_device(x, device)
    model.to(dev)
    x = x.to(dev)
    param_bytes = sum(p.nbytes for p in _parameters(model))
    with torch.no_grad():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            start = time.perf_counter()
            out = model(x)
            torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(dev) - base
            meter = "cuda"
        else:
            activities = [torch.profiler.ProfilerActivity.CPU]
            with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
                start = time.perf_counter()
                out = model(x)
                seconds = time.perf_counter() - start
            peak, _ = _profiler_running_total(prof)
            meter = "cpu-profiler"
    output_bytes = sum(t.nbytes for t in _tensors_of(out))
    return out, ForwardMeasurement(peak_bytes=peak, param_bytes=param_bytes, input_bytes=x.nbytes,
                                   output_bytes=output_bytes, seconds=seconds, device=str(dev), meter=meter)


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of the tensors in an optimizer's state (0 for ``None``).

    Accepts a ``torch.optim.Optimizer`` or an
    :class:`~iunet_nb.engine.optim_in_backward.OptimizerInBackward` (the sum over its
    per-parameter optimizers).
    """
    if optimizer is None:
        return 0
    if isinstance(optimizer, OptimizerInBackward):
        return sum(optimizer_state_bytes(o) for o in optimizer.optimizers.values())
    return sum(
        v.nbytes for state in optimizer.state.values() for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def time_step(
    model: nn.Module,
    x: torch.Tensor,
    loss_fn: Optional[LossFn] = None,
    repeats: int = 3,
    warmup: int = 1,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> list[float]:
    """Wall times in seconds of ``repeats`` training steps, without profiler.

    ``warmup`` untimed steps run first; gradients are set to ``None`` before
    every step.  On CUDA the device is synchronised around each step.  The
    caller chooses the thread count (``torch.set_num_threads``).  With
    ``optimizer``, its ``step()`` is part of every timed step.
    """
    cuda = x.device.type == "cuda"
    params = _parameters(model)
    times: list[float] = []
    for i in range(warmup + repeats):
        for p in params:
            p.grad = None
        if cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        _run_step(model, x, loss_fn, optimizer)
        if cuda:
            torch.cuda.synchronize(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


_RSS_DRIVER = """
import json, re, sys

def _status_kib(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\\s+(\\d+) kB", f.read()).group(1))

_src = json.loads(sys.stdin.read())
_g = {"__name__": "__peak_rss__"}
exec(compile(_src["setup"], "<setup>", "exec"), _g)
_before = _status_kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
_reset_ok = _status_kib("VmHWM") <= _before + 64
exec(compile(_src["step"], "<step>", "exec"), _g)
print(json.dumps({"before_kib": _before, "hwm_kib": _status_kib("VmHWM"),
                  "reset_ok": _reset_ok}))
"""


def peak_rss_of(
    step: str,
    setup: str = "",
    *,
    threads: int = 1,
    timeout: float = 600.0,
) -> int:
    """Peak RSS rise, in bytes, of running ``step`` in a fresh Python process.

    ``setup`` runs first (imports, model, input, a warm-up step); then the
    peak-RSS mark is reset (``/proc/self/clear_refs``), ``step`` runs, and the
    result is ``VmHWM - VmRSS`` where ``VmRSS`` is read just before ``step``.
    Both snippets share one namespace.  The child runs with
    ``MALLOC_MMAP_THRESHOLD_=65536`` (so that freed large blocks go back to
    the OS and RSS follows the live memory) and ``threads`` OpenMP threads;
    this makes it slower, so never time under it.  Linux only.
    """
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["OMP_NUM_THREADS"] = str(threads)
    repo_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (repo_root, env.get("PYTHONPATH", "")) if p
    )
    payload = json.dumps(
        {"setup": textwrap.dedent(setup), "step": textwrap.dedent(step)}
    )
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_DRIVER],
        input=payload,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"peak_rss_of: child failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["reset_ok"]:
        raise RuntimeError("peak_rss_of: could not reset VmHWM via /proc/self/clear_refs")
    return (result["hwm_kib"] - result["before_kib"]) * 1024
