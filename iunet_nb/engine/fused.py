"""The fused engine: one autograd function over a chain of invertible steps.

An iUNet body is written as a flat list of *steps* (:mod:`iunet_nb.engine.steps`)
acting on a small state: the current activation and a stack of skip
activations (the channels each level keeps).  Every step is invertible, so the
backward pass can start from the body's output alone and walk the steps in
reverse, rebuilding each step's input from its output while computing the
gradients (the contract: :mod:`iunet_nb.engine.contract`).

:class:`FusedInvertibleFunction` runs the forward without recording a graph
and stores only the output.  In the backward, each additive coupling
``(u, v) -> (v, u + f(v))`` is undone *and* differentiated with a single
evaluation of ``f`` (about 4 forward-equivalents per coupling; conventional
backprop costs 3, memcnn's inverse-then-recompute 5).  Orthogonal kernels of
the up/downsampling and channel mixing are computed without a graph in the
forward and recomputed, with their graph, only inside their own backward step.
The other engine, ``memcnn`` (every step wrapped in
``memcnn.InvertibleModuleWrapper``, as in the paper), is built in
:mod:`iunet_nb.arch.iunet`.

The incoming gradient and the consuming mode
--------------------------------------------
By default the backward holds, besides its own activation and gradient, the
caller's output ``y`` (ownership note 1) -- unless the caller has dropped it
and nothing else holds its memory (e.g. a convolution after the body, whose saved
input autograd has freed by then), and the graph is not kept
(``retain_graph=True``): then no one can read ``y`` again, and the backward
rebuilds the activations in its memory (ownership note 12).  The incoming gradient ``dy`` is
reused for the engine's gradients when nothing but autograd's call refers to
it (ownership note 10, the rule for ``dy`` below): then no one can read it
afterwards, and one input-sized tensor is saved.  With
``consume_output=True`` (opt-in) the backward also takes over the memory of
``y`` (ownership note 9), which saves a second one; it also computes the
largest couplings slab by slab in the forward (``CouplingStep(slab_forward=True)``:
one more convolution each, no activation-sized temporary).  The rules:

* ``y`` is taken only if it is dense and the whole of its memory, and no
  tensor shares that memory but the returned output and the views registered
  with :func:`add_output_view` (a view or ``detach()`` the caller took before
  the backward keeps ``y`` intact: the mode then does nothing for ``y``).
  The storage's use count, which this check reads, also counts the engine's
  own references (:data:`ENGINE_REFERENCES`).
* ``dy`` (in both modes) is taken only if it is dense, the whole of its memory, in the
  output's dtype, and nothing else refers to it: not a gradient passed
  explicitly (``y.backward(g)`` leaves ``g`` intact), not the expanded
  gradient of ``y.sum()``, and not when the output has hooks
  (``register_hook``), which could keep it.  ``y.retain_grad()`` is safe:
  autograd stores a copy in ``y.grad``.
* Once the backward takes ``y``, the output and its registered views are
  switched to :class:`ConsumedTensor` (and so is a taken ``dy``, which a hook
  of an output the caller has dropped may have kept): every use raises
  :data:`CONSUMED_MESSAGE`; metadata such as ``shape`` and ``grad`` stays
  readable.  Their memory itself is freed as soon as the backward no longer
  needs it -- freeing alone would not do, since reading a tensor whose storage
  was resized to zero is no error in torch (it reads freed memory).  A second
  backward through the same graph (``retain_graph=True``) raises the same
  error; autograd nodes that saved ``y`` themselves (the loss's) fail on their
  version check.
* Under autocast the output is a cast copy of the body's output: it stays
  readable, and only the body's output and ``dy``'s float copy are taken.
* The input gradient ``dx`` never lives in freed memory.
"""
from __future__ import annotations

import sys
import weakref
from typing import Any, Sequence

import torch
from torch import Tensor

from iunet_nb.engine.contract import Step
from iunet_nb.engine.parts import Part, State, full, owned_copy, release_unreferenced, storage_alias

__all__ = ["DOUBLE_BACKWARD_MESSAGE", "CONSUMED_MESSAGE", "ENGINE_REFERENCES", "EARLY_GRADIENTS",
           "ConsumedTensor", "run_forward", "FusedInvertibleFunction", "apply_fused", "add_output_view"]

#: The error for ``torch.autograd.grad(..., create_graph=True)`` through an engine.
DOUBLE_BACKWARD_MESSAGE = (
    "double backward (torch.autograd.grad(..., create_graph=True) or backward(create_graph=True), "
    "e.g. for a gradient penalty) is not supported by the memory-efficient engines, which do not "
    "record a graph of their backward. Build the model with disable_custom_gradient=True (or set "
    "model.disable_custom_gradient = True for that loss) to use plain autograd, which supports it."
)


#: The error for any use of a consumed output, and for a second backward through it.
CONSUMED_MESSAGE = (
    "consume_output=True: the output was consumed by the first backward, which reused its memory "
    "(and that of its incoming gradient) for the engine's own activations, so its values are gone. "
    "Use the output before calling backward (or keep a .clone() of it), do not call backward twice "
    "through it (retain_graph=True), or build the model with consume_output=False."
)

#: References to the output's storage that the consuming mode's check finds in the engine
#: itself: the saved output, its unpacked copy and the storage object the check reads.
ENGINE_REFERENCES = 3


class ConsumedTensor(Tensor):
    """What a consumed output becomes: every use raises :data:`CONSUMED_MESSAGE`.

    Metadata that does not read the values stays available (``shape``,
    ``size()``, ``dtype``, ``device``, ``grad``, ``grad_fn``, ...), and its
    ``repr`` says what happened instead of showing freed memory.
    """

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise RuntimeError(CONSUMED_MESSAGE)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        with torch._C.DisableTorchFunctionSubclass():
            return (f"ConsumedTensor(shape={tuple(self.shape)}, dtype={self.dtype}: "
                    "consumed by the backward with consume_output=True)")


_METADATA = frozenset({
    Tensor.shape.__get__, Tensor.size, Tensor.dim, Tensor.ndim.__get__, Tensor.dtype.__get__,
    Tensor.device.__get__, Tensor.requires_grad.__get__, Tensor.grad.__get__,
    Tensor.retains_grad.__get__, Tensor.grad_fn.__get__, Tensor.is_leaf.__get__, Tensor.__hash__,
})


def _tensor_slices(steps: Sequence[Step]) -> list[slice]:
    """Where each step's tensors lie in the flat list of all steps' tensors."""
    slices, start = [], 0
    for step in steps:
        n = len(step.tensors())
        slices.append(slice(start, start + n))
        start += n
    return slices


def run_forward(steps: Sequence[Step], x: Tensor, tensors: Sequence[Tensor],
                records: list[dict] | None = None) -> Tensor:
    """Run ``steps`` on ``x`` ``(N, C, *S)``; return the output (ownership note 1).

    ``tensors``: the concatenation of every step's ``tensors()``; ``records``, if
    given, receives each step's record.
    """
    st = State([Part(x, False)])
    for step, sl in zip(steps, _tensor_slices(steps)):
        record: dict = {}
        step.forward(st, tensors[sl], record)
        if records is not None:
            records.append(record)
    assert not st.stack, "unbalanced split/concat steps"
    out = full(st.cur)
    if not out.owned:
        return out.tensor.clone()
    # The whole of a buffer the steps made (note 11) is returned as a tensor of its own, not
    # as a view of their buffer: a view keeps its base alive (note 9 counts the memory's users).
    return storage_alias(out.tensor) if out.tensor._base is not None else out.tensor


#: ``id(tensor) -> (weakref to tensor, callback)``: leaf tensors whose gradient the fused
#: backward hands to ``callback(tensor, grad)`` as soon as its step is back-propagated, instead
#: of returning it with all the others at the end (autograd then sees no gradient for it).
#: Used by :mod:`iunet_nb.engine.optim_in_backward`, so that all gradients never exist at once.
EARLY_GRADIENTS: dict[int, tuple["weakref.ref[Tensor]", Any]] = {}


def _early_callback(t: Tensor) -> Any:
    entry = EARLY_GRADIENTS.get(id(t))
    return entry[1] if entry is not None and entry[0]() is t else None


class FusedInvertibleFunction(torch.autograd.Function):
    """Autograd function over a chain of invertible steps that stores only its output.

    ``apply(steps, consume_output, x, *tensors)`` with ``x`` of shape
    ``(N, C, *spatial)``, ``consume_output`` the consuming mode (module
    docstring) and ``tensors`` the flat list of every step's gradient-receiving
    inputs (the parameters of the couplings and of the orthogonal parametrisations).
    """

    @staticmethod
    def forward(ctx: Any, steps: Sequence[Step], consume_output: bool, x: Tensor,
                *tensors: Tensor) -> Tensor:
        records: list[dict] = []
        device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.x_meta = (x.dtype, x.requires_grad)
        # Under autocast the body runs in its parameters' dtype (an exact inverse needs it: a
        # coupling undone in bfloat16 loses the input) and returns the autocast dtype, as the
        # layers of the conventional network would.
        body_dtype = next((t.dtype for t in tensors if t.is_floating_point()), x.dtype)
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            y = run_forward(steps, x.to(body_dtype) if ctx.autocast[0] else x, tensors, records)
        ctx.steps = steps
        ctx.records = records
        ctx.device_type = device_type
        ctx.save_for_backward(y, *tensors)
        out = y.to(ctx.autocast[1]) if ctx.autocast[0] else y
        ctx.consume_output, ctx.consumed = bool(consume_output), False
        # The output and the views registered by the caller (add_output_view), for note 9.
        ctx.outputs = [weakref.ref(out)]
        return out

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:
        dy_references = sys.getrefcount(dy)  # first: compared with _ReferenceProbe's count
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        if ctx.consumed:  # before unpacking: the saved output's memory is gone
            raise RuntimeError(CONSUMED_MESSAGE)
        y, *tensors = ctx.saved_tensors
        steps: Sequence[Step] = ctx.steps
        grads: list[Tensor | None] = [None] * len(tensors)
        st, gst = _backward_states(ctx, y, dy, dy_references)
        del y  # the state holds it
        slices = _tensor_slices(steps)
        with torch.no_grad(), torch.autocast(ctx.device_type, enabled=False):
            for step, sl, record in zip(reversed(steps), reversed(slices), reversed(ctx.records)):
                step_grads = step.backward(st, gst, tensors[sl], record)
                release_unreferenced(st)  # ownership note 9
                release_unreferenced(gst)
                for i, g in zip(range(sl.start, sl.stop), step_grads):
                    if g is not None:
                        g = g.to(tensors[i].dtype)
                        early = _early_callback(tensors[i]) if EARLY_GRADIENTS else None
                        if early is None:
                            grads[i] = g
                        else:  # handed over now (e.g. an optimizer step), not at the end
                            early(tensors[i], g)
        st.cur = []  # the rebuilt input is not needed any more: free it before joining dx
        dx = owned_copy(full(gst.cur)).tensor.to(ctx.x_meta[0])  # never the caller's dy
        gst.cur = []
        release_unreferenced(st, keep=[dx])  # what is left of y and dy, not what dx uses
        release_unreferenced(gst, keep=[dx])
        # ctx.records stay (ownership note 8).
        return (None, None, dx, *grads)


def _whole_of_its_memory(t: Tensor) -> bool:
    """Whether ``t`` is dense and is all of its storage (no offset, no expansion, no overlap)."""
    return (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def _alive_outputs(ctx: Any) -> list[Tensor]:
    """The returned output and the registered views (:func:`add_output_view`) still alive."""
    return [t for t in (ref() for ref in ctx.outputs) if t is not None]


def _output_sharers(ctx: Any, y: Tensor) -> list[Tensor] | None:
    """The caller's tensors that share the saved output's memory, or None if some are unknown.

    Known are the returned output and the views registered with
    :func:`add_output_view`; any other reference (a view, a ``detach()``) shows
    in the storage's use count beyond :data:`ENGINE_REFERENCES`.
    """
    storage = y.untyped_storage()
    known = [t for t in _alive_outputs(ctx) if t.untyped_storage().data_ptr() == storage.data_ptr()]
    if any(type(t) is not Tensor for t in known):
        return None
    if torch._C._storage_Use_Count(storage._cdata) != ENGINE_REFERENCES + len(known):
        return None
    return known


class _ReferenceProbe(torch.autograd.Function):
    """Measures how many Python references a backward's gradient argument has when
    nothing but autograd's call holds it (the count depends on the interpreter)."""

    count: int | None = None

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        return x * 1

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        references = sys.getrefcount(grad)  # the same statement as the engine's backward's first
        _ReferenceProbe.count = references
        return grad


def _probe_references() -> int:
    """Python references of a backward's gradient that only autograd's call holds
    (run once, when this module is imported: not from inside a backward)."""
    with torch.inference_mode(False), torch.enable_grad():  # whatever mode imports us
        x = torch.zeros(2, requires_grad=True)
        (_ReferenceProbe.apply(x) * 2).sum().backward()
    assert _ReferenceProbe.count is not None
    return _ReferenceProbe.count


#: see :func:`_probe_references`
UNREACHABLE_REFERENCES = _probe_references()


def _gradient_reusable(ctx: Any, dy: Tensor, y: Tensor, dy_references: int) -> bool:
    """Whether the engine may rebuild gradients in ``dy``'s memory (ownership notes 9, 10).

    Only the argument itself holds the tensor (a gradient passed explicitly is also held
    by the caller and by autograd's graph root), only that tensor and the storage object
    read here hold the memory, and no output has hooks (which may have kept it).  By
    default also no Python reference beyond autograd's call (a hook of an output the
    caller dropped may have stored the gradient); the consuming mode instead makes such
    a reference raise (:class:`ConsumedTensor`).
    """
    if any(t._backward_hooks for t in _alive_outputs(ctx)):
        return False
    storage = dy.untyped_storage()
    reachable = (type(dy) is not Tensor or dy._use_count() != 1
                 or torch._C._storage_Use_Count(storage._cdata) != 2)
    if reachable or dy.dtype != y.dtype or not _whole_of_its_memory(dy):
        return False
    return ctx.consume_output or dy_references <= UNREACHABLE_REFERENCES


def _output_takeable(ctx: Any, y: Tensor) -> bool:
    """Whether the backward may consider taking ``y``'s memory (ownership notes 9 and 12).

    In the consuming mode whenever ``y`` is dense and the whole of its memory; by default
    also only when the graph is not kept (``retain_graph=True`` would run this backward
    again, from ``y``).  Who else shares ``y`` is checked by :func:`_output_sharers`.
    """
    if not _whole_of_its_memory(y):
        return False
    return ctx.consume_output or not torch._C._autograd._get_current_graph_task_keep_graph()


def _backward_states(ctx: Any, y: Tensor, dy: Tensor, dy_references: int) -> tuple[State, State]:
    """The state and the gradient state the backward starts from.

    Ownership note 1 by default: ``y`` is the caller's (a cast ``dy`` is a new
    tensor of our own), unless no tensor of the caller shares it any more and the
    graph is not kept (note 12); a ``dy`` that nothing else refers to is taken in
    both modes (note 10).  In the consuming mode (note 9) the tensors sharing a taken
    ``y`` become :class:`ConsumedTensor` s at once, and so does a taken ``dy``:
    from here on their memory holds the engine's activations.
    """
    sharers = _output_sharers(ctx, y) if _output_takeable(ctx, y) else None
    if not ctx.consume_output and sharers:  # by default only an output no one can reach (note 12)
        sharers = None
    st = State([Part(y, sharers is not None)], consumed=[y] if sharers is not None else [])
    if _gradient_reusable(ctx, dy, y, dy_references):  # in both modes (ownership notes 9, 10)
        grad = dy.detach()  # the engine's handle on the memory; the argument itself is switched
        dy.__class__ = ConsumedTensor
        gst = State([Part(grad, True)], consumed=[grad])
    else:
        gst = State([Part(dy.to(y.dtype), dy.dtype != y.dtype)])
    if sharers is not None:
        ctx.consumed = True
        # Autograd nodes that saved y themselves now fail their version check if run again.
        torch.autograd.graph.increment_version(y)
        for t in sharers:
            t.__class__ = ConsumedTensor
    return st, gst


def add_output_view(output: Tensor, view: Tensor) -> None:
    """Consume ``view``, a view of ``output`` made by the caller, together with ``output``.

    ``output``: a tensor returned by :func:`apply_fused` with
    ``consume_output=True``; a caller that hands on a view of it instead (e.g.
    the model's crop of its padding) registers the view here, so that the
    consuming mode knows every tensor sharing the output's memory.  No effect
    for other outputs.
    """
    outputs = getattr(output.grad_fn, "outputs", None)
    if outputs and getattr(output.grad_fn, "consume_output", False):
        outputs.append(weakref.ref(view))


def apply_fused(steps: Sequence[Step], x: Tensor, consume_output: bool = False) -> Tensor:
    """``steps`` applied to ``x`` with memory-efficient backpropagation.

    ``x``: ``(N, C, *spatial)``.  Only the output is kept for the backward, which
    rebuilds every step's input from its output.  Each step's gradient-receiving
    tensors (``step.tensors()``) get their gradients.  ``consume_output``: the
    backward may take over the memory of the output and of its incoming
    gradient (the module docstring's consuming mode).
    """
    tensors = [t for step in steps for t in step.tensors()]
    return FusedInvertibleFunction.apply(steps, consume_output, x, *tensors)
