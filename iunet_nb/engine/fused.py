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
  Who else holds that memory is read from counts compared with those of a probe
  (:func:`iunet_nb.torch_internals.reference_baselines`).
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

from iunet_nb import torch_internals as internals
from iunet_nb.engine.contract import Step
from iunet_nb.engine.parts import Part, State, full, owned_copy, release_unreferenced, storage_alias

__all__ = ["DOUBLE_BACKWARD_MESSAGE", "CONSUMED_MESSAGE", "GRADIENT_CONSUMED_MESSAGE", "EARLY_GRADIENTS",
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

#: The error for any use of an incoming gradient the consuming mode took over.
GRADIENT_CONSUMED_MESSAGE = (
    "consume_output=True: this tensor is the incoming gradient of a model output that the "
    "backward consumed; its memory now holds the engine's own gradients, so its values are gone. "
    "A hook that needs the gradient should keep a .clone() of it, or build the model with "
    "consume_output=False (the default), which never reuses a gradient that someone else holds."
)


class ConsumedTensor(Tensor):
    """What a consumed output becomes: every use raises :data:`CONSUMED_MESSAGE`.

    Metadata that does not read the values stays available (``shape``,
    ``size()``, ``dtype``, ``device``, ``grad``, ``grad_fn``, ...), and its
    ``repr`` says what happened instead of showing freed memory.
    """

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if func in _METADATA:
            with internals.plain_tensor_functions():
                return func(*args, **(kwargs or {}))
        consumed = next((a for a in args if isinstance(a, ConsumedTensor)), None)
        raise RuntimeError(getattr(consumed, "_iunet_consumed_message", CONSUMED_MESSAGE))

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        with internals.plain_tensor_functions():
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
        # A saved-tensor hook sees the saved output and may keep it: then y is never taken.
        ctx.saved_tensor_hooks = internals.saved_tensor_hooks_active()
        ctx.device_type = device_type
        ctx.save_for_backward(y, *tensors)
        out = y.to(ctx.autocast[1]) if ctx.autocast[0] else y
        ctx.consume_output, ctx.consumed = bool(consume_output), False
        # The output and the views registered by the caller (add_output_view), for note 9.
        ctx.outputs = [weakref.ref(out)]
        return out

    @staticmethod
    @internals.run_eagerly  # compilers run it as it is (the probe's backward is wrapped alike)
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:
        references = sys.getrefcount(dy)  # first use of dy: as in torch_internals._Probe.backward
        seen = internals.observe_gradient(dy, references)
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        if ctx.consumed:  # before unpacking: the saved output's memory is gone
            raise RuntimeError(CONSUMED_MESSAGE)
        y, *tensors = ctx.saved_tensors
        steps: Sequence[Step] = ctx.steps
        grads: list[Tensor | None] = [None] * len(tensors)
        st, gst = _backward_states(ctx, y, dy, seen)
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
                        if early is not None and not internals.will_accumulate(tensors[i]):
                            # Autograd would not accumulate it in this backward (inputs=,
                            # autograd.grad, or unknown): no step; autograd decides as usual.
                            early = None
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
    """The caller's tensors that share the saved output's memory, or None if some may be unknown.

    Known are the returned output and the views registered with
    :func:`add_output_view`.  Any other owner -- a view, a ``detach()``, a tensor a
    saved-tensor hook kept, a numpy array or DLPack capsule made from one of them --
    shows in the storage's use count beyond the baseline of
    :func:`~iunet_nb.torch_internals.reference_baselines`; a storage object the
    caller kept (``y.untyped_storage()``) in its Python reference count.  Where
    a count cannot be read, or the baselines are unknown, the answer is None.
    """
    storage = y.untyped_storage()
    known = [t for t in _alive_outputs(ctx) if t.untyped_storage().data_ptr() == storage.data_ptr()]
    if any(type(t) is not Tensor for t in known):
        return None
    base = internals.reference_baselines()
    uses = internals.storage_use_count(y)
    references = internals.python_references(storage)
    if base is None or uses is None or references is None:
        return None
    if uses != base.output_storage_uses + len(known) or references > base.output_storage_references:
        return None
    return known


def _gradient_reusable(ctx: Any, dy: Tensor, y: Tensor, seen: internals.GradientObservation) -> bool:
    """Whether the engine may rebuild gradients in ``dy``'s memory (ownership notes 9, 10).

    ``seen``: what :func:`~iunet_nb.torch_internals.observe_gradient` saw of ``dy`` first
    thing in the backward.  Only torch's allocator made the memory (not numpy, DLPack or
    another library: their buffers stay theirs), and every count equals the baseline of
    an argument nothing but autograd holds: no other tensor or view, no storage object, no
    Python reference (a hook may have stored the gradient), no hook on an output.  In the
    consuming mode Python references above the baseline are allowed: they are switched to
    :class:`ConsumedTensor` and raise on use.
    """
    if type(dy) is not Tensor or not seen.resizable or dy.dtype != y.dtype \
            or not _whole_of_its_memory(dy):
        return False
    if any(internals.tensor_has_hooks(t) for t in _alive_outputs(ctx)):
        return False
    base = internals.reference_baselines()
    if base is None:
        return False
    b = base.gradient
    counts = (seen.tensor_uses, seen.storage_uses, seen.storage_references)
    if None in counts or counts != (b.tensor_uses, b.storage_uses, b.storage_references):
        return False
    if ctx.consume_output:
        return True
    return seen.references is not None and b.references is not None and seen.references <= b.references


def _output_takeable(ctx: Any, y: Tensor) -> bool:
    """Whether the backward may consider taking ``y``'s memory (ownership notes 9 and 12).

    ``y`` must be dense and the whole of its memory, and no saved-tensor hook may
    have been active in the forward (it saw ``y`` and may keep it).  By default also
    only when the graph is not kept (``retain_graph=True`` would run this backward
    again, from ``y``).  Who else shares ``y`` is checked by :func:`_output_sharers`.
    """
    if not _whole_of_its_memory(y) or ctx.saved_tensor_hooks:
        return False
    return ctx.consume_output or not internals.graph_is_kept()


def _backward_states(ctx: Any, y: Tensor, dy: Tensor,
                     seen: internals.GradientObservation) -> tuple[State, State]:
    """The state and the gradient state the backward starts from.

    Ownership note 1 by default: ``y`` is the caller's (a cast ``dy`` is a new
    tensor of our own), unless no one else can reach it and the graph is not kept
    (note 12); a ``dy`` no one else can reach is taken in both modes (note 10).  In
    the consuming mode (note 9) the tensors sharing a taken ``y`` become
    :class:`ConsumedTensor` s at once, and so does a taken ``dy``: from here on their
    memory holds the engine's activations.  By default nothing is switched: what is
    taken has no other owner.
    """
    sharers = _output_sharers(ctx, y) if _output_takeable(ctx, y) else None
    if not ctx.consume_output and sharers:  # by default only an output no one can reach (note 12)
        sharers = None
    st = State([Part(y, sharers is not None)], consumed=[y] if sharers is not None else [])
    if _gradient_reusable(ctx, dy, y, seen):  # in both modes (ownership notes 9, 10)
        grad = dy.detach()  # the engine's handle on the memory
        if ctx.consume_output:  # Python references to the argument raise from now on
            _consume(dy, GRADIENT_CONSUMED_MESSAGE)
        gst = State([Part(grad, True)], consumed=[grad])
    else:
        gst = State([Part(dy.to(y.dtype), dy.dtype != y.dtype)])
    if sharers is not None:
        ctx.consumed = True
        # Autograd nodes that saved y themselves now fail their version check if run again.
        torch.autograd.graph.increment_version(y)
        for t in sharers:
            _consume(t, CONSUMED_MESSAGE)
    return st, gst


def _consume(t: Tensor, message: str) -> None:
    """Switch ``t`` to :class:`ConsumedTensor`, whose every use raises ``message``."""
    t.__class__ = ConsumedTensor
    t._iunet_consumed_message = message


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
    internals.reference_baselines()  # measured here, outside any backward, the first time
    return FusedInvertibleFunction.apply(steps, consume_output, x, *tensors)
