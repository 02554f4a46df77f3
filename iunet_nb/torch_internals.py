"""Every private torch and CPython detail the package reads, in one place, each with a safe answer.

The memory-efficient engine may reuse memory only where it can show that no one
else can reach it (``docs/engine.md``, "Ownership").  Some of what it must know
has no public torch API: how many tensors share a storage, whether the graph is
being kept, whether saved-tensor hooks are active, whether autograd will
accumulate a leaf's gradient in the running backward, which hooks a module has.
Each is read here, and only here, through a function whose answer is
*conservative* whenever the detail cannot be read: a count that cannot be read
is ``None`` (the caller then assumes someone else holds the memory), a question
that cannot be answered is answered so that nothing is reused, freed or stepped.

The details are trusted only on the torch versions and interpreters they were
checked on (:data:`CHECKED_TORCH`, CPython); elsewhere, and inside
:func:`unavailable` (which the tests use to exercise the fallbacks), every
function gives its conservative answer.

Python reference counts
    ``sys.getrefcount`` of an argument depends on the interpreter (and grows while
    a tracer or profiler has looked at the frame).  :func:`reference_baselines`
    measures, in a backward of a probe function with no tracer, profiler or
    saved-tensor hook active, what the counts are when nothing but autograd holds
    the argument: it is measured again whenever it could not be measured cleanly,
    and a count above the baseline means "someone else may hold it".
"""
from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "CHECKED_TORCH", "available", "unavailable", "storage_use_count", "tensor_use_count",
    "python_references", "graph_is_kept", "saved_tensor_hooks_active", "will_accumulate",
    "module_has_hooks", "tensor_has_hooks", "ReferenceBaselines", "reference_baselines",
    "observe_gradient", "GradientObservation", "run_eagerly", "plain_tensor_functions",
]

#: The torch versions (inclusive range of ``(major, minor)``) whose internals this module
#: was checked against.  Outside it every function gives its conservative answer.
CHECKED_TORCH: tuple[tuple[int, int], tuple[int, int]] = ((2, 4), (2, 13))

_state = threading.local()


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):  # pragma: no cover - unusual version strings
        return (0, 0)


_VERSION_CHECKED = CHECKED_TORCH[0] <= _torch_version() <= CHECKED_TORCH[1]
_CPYTHON = sys.implementation.name == "cpython" and hasattr(sys, "getrefcount")


def available() -> bool:
    """Whether the private details may be read (checked torch, CPython, not :func:`unavailable`)."""
    return _VERSION_CHECKED and _CPYTHON and not getattr(_state, "disabled", False)


@contextlib.contextmanager
def unavailable() -> Iterator[None]:
    """Within this context (in this thread) every function answers as if the details were missing."""
    before = getattr(_state, "disabled", False)
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = before


def storage_use_count(t: Tensor) -> int | None:
    """How many C++ owners ``t``'s storage has (tensors, views, storage objects); None if unknown."""
    if not available():
        return None
    try:
        return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))
    except (AttributeError, RuntimeError, TypeError):
        return None


def tensor_use_count(t: Tensor) -> int | None:
    """How many C++ owners ``t``'s tensor implementation has; None if unknown."""
    if not available():
        return None
    try:
        return int(t._use_count())
    except (AttributeError, RuntimeError, TypeError):
        return None


def python_references(obj: Any) -> int | None:
    """``sys.getrefcount(obj)`` on CPython; None where it is unknown."""
    return sys.getrefcount(obj) if available() else None


def graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); True if unknown."""
    if not available():
        return True
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``) are active now.

    Such a hook sees every tensor autograd saves and may keep it (an activation
    logger, an offloading cache).  True if unknown.
    """
    if not available():
        return True
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, RuntimeError, TypeError):
        return True


def will_accumulate(t: Tensor) -> bool | None:
    """Whether the running backward will accumulate a gradient into leaf ``t``.

    False for a leaf that ``torch.autograd.grad(loss, inputs)`` or
    ``backward(inputs=...)`` leaves out, and for one that does not require grad;
    None if it cannot be told (the caller then must not act on the gradient).
    """
    if not t.requires_grad:
        return False
    if not available() or t.grad_fn is not None:
        return None
    try:
        with torch.enable_grad():  # a backward runs without grad mode: no grad_fn there
            node = t.view_as(t).grad_fn.next_functions[0][0]  # t's AccumulateGrad node
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError, IndexError, TypeError):
        return None


_CALL_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def module_has_hooks(module: nn.Module, recurse: bool = True) -> bool:
    """Whether a call of ``module`` (or, with ``recurse``, of any of its submodules) runs a hook.

    Forward, forward-pre and backward hooks of the modules themselves and the
    global module hooks (``torch.nn.modules.module.register_module_*_hook``).
    True if unknown.
    """
    if not available():
        return True
    try:
        import torch.nn.modules.module as module_impl

        if any(getattr(module_impl, name) for name in _GLOBAL_HOOKS):
            return True
        modules = module.modules() if recurse else [module]
        return any(getattr(m, name) for m in modules for name in _CALL_HOOK_DICTS)
    except AttributeError:
        return True


def plain_tensor_functions() -> Any:
    """Context in which a tensor subclass's ``__torch_function__`` is not consulted (torch's own
    ``DisableTorchFunctionSubclass``, as its documentation's subclass examples use)."""
    return torch._C.DisableTorchFunctionSubclass()


def tensor_has_hooks(t: Tensor) -> bool:
    """Whether ``register_hook`` has put a gradient hook on ``t``; True if unknown."""
    if not available():
        return True
    try:
        return bool(t._backward_hooks)
    except AttributeError:
        return True


@dataclass(frozen=True)
class GradientObservation:
    """What can be seen of a backward's incoming gradient (:func:`observe_gradient`)."""

    references: int | None  #: Python references to the tensor
    tensor_uses: int | None  #: C++ owners of the tensor
    storage_uses: int | None  #: C++ owners of its storage
    storage_references: int | None  #: Python references to its storage object
    resizable: bool  #: torch allocated it (not numpy's, DLPack's or another library's memory)


def observe_gradient(grad: Tensor, references: int | None) -> GradientObservation:
    """What can be seen of ``grad``; ``references``: ``sys.getrefcount(grad)`` read first thing."""
    storage = grad.untyped_storage()
    return GradientObservation(
        references=references if available() else None,
        tensor_uses=tensor_use_count(grad),
        storage_uses=storage_use_count(grad),
        storage_references=python_references(storage),
        resizable=bool(storage.resizable()),
    )


@dataclass(frozen=True)
class ReferenceBaselines:
    """The counts that mean "only autograd holds it", measured by :func:`reference_baselines`."""

    gradient: GradientObservation  #: of an incoming gradient nothing else refers to
    output_storage_uses: int  #: owners of a saved output's storage once the caller dropped it
    output_storage_references: int  #: Python references to that storage's object


def _compiler_disable() -> Any:
    """``torch.compiler.disable``, with the compiler's import kept from touching ``warnings.filters``.

    ``torch.compiler.disable`` imports ``torch._dynamo``, which imports sympy, which adds a
    warnings filter; importing this package must leave the filters as they were.
    """
    with warnings.catch_warnings():
        import torch._dynamo  # noqa: F401
    return torch.compiler.disable


#: Decorator: the function runs eagerly, never traced by ``torch.compile`` or compiled
#: autograd (the engine decides what memory to reuse from real tensors).
run_eagerly = _compiler_disable()


class _Probe(torch.autograd.Function):
    """A function with an unreachable output and an unreachable incoming gradient."""

    seen: tuple[GradientObservation, int | None, int | None] | None = None

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        y = x * 1
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @run_eagerly  # as the engine's backward, so that the counts are the same
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        references = sys.getrefcount(grad)  # the same statement as the engine's backward's first
        gradient = observe_gradient(grad, references)
        (y,) = ctx.saved_tensors
        storage = y.untyped_storage()
        _Probe.seen = (gradient, storage_use_count(y), python_references(storage))
        return grad


_baselines: ReferenceBaselines | None = None
_lock = threading.Lock()


def reference_baselines() -> ReferenceBaselines | None:
    """The counts of an argument only autograd holds, or None where they cannot be measured.

    Measured once per process, the first time it is asked outside a backward with
    no saved-tensor hook active, with this thread's tracer and profiler switched
    off for the measurement (a tracer that reads frame locals adds references);
    until then None.  Call it outside a backward (the engine calls it in its forward).
    """
    global _baselines
    if not available():
        return None
    if _baselines is not None:
        return _baselines
    if saved_tensor_hooks_active():
        return None
    with _lock:
        if _baselines is None:
            _baselines = _measure_baselines()
    return _baselines


def _measure_baselines() -> ReferenceBaselines | None:
    trace, profile = sys.gettrace(), sys.getprofile()
    sys.settrace(None)
    sys.setprofile(None)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.zeros(4, requires_grad=True)
            (_Probe.apply(x) * 2).sum().backward()
    finally:
        sys.settrace(trace)
        sys.setprofile(profile)
    seen, _Probe.seen = _Probe.seen, None
    if seen is None or seen[1] is None or seen[2] is None:
        return None
    return ReferenceBaselines(gradient=seen[0], output_storage_uses=seen[1],
                              output_storage_references=seen[2])
