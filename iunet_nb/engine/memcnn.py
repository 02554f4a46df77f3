"""Import the reference library ``memcnn`` (1.5.2) without its side effects.

``memcnn`` is only used as the *reference* implementation that the notebooks
compare against; nothing in :mod:`iunet_nb` needs it to work.  Importing it
plainly has two side effects that this module routes around:

1. ``memcnn/models/affine.py`` runs ``warnings.filterwarnings('ignore',
   category=UserWarning)`` at import time, which silences *every* UserWarning
   of the whole process from then on.  :func:`import_memcnn` imports inside
   :class:`warnings.catch_warnings`, so ``warnings.filters`` afterwards is the
   very list it was before (same object, same entries).

2. ``memcnn/models/revop.py`` decorates its autograd function with
   ``torch.cuda.amp.custom_fwd`` / ``custom_bwd``, which torch >= 2.4 marks as
   deprecated (a ``FutureWarning`` at decoration time, i.e. at import; an
   error under ``python -W error::FutureWarning``).  During the import we
   temporarily replace these two names by
   ``functools.partial(torch.amp.custom_fwd/custom_bwd, device_type='cuda')``
   -- exactly what the deprecated wrappers call themselves, so behaviour is
   unchanged -- and put the originals back afterwards.  No warning is
   silenced: the warnings are never emitted.

Runtime: ``InvertibleModuleWrapper(..., keep_input=False)`` frees its input
with ``tensor.storage().resize_(0)``.  Under torch 2.13 ``Tensor.storage()``
emits no FutureWarning or DeprecationWarning; it emits torch's "TypedStorage
is deprecated" warning, which is a plain *UserWarning*, and only once per
process (torch remembers it has warned).  memcnn's global UserWarning filter
would hide it; as :func:`import_memcnn` keeps that filter out, a user of
memcnn's wrapper sees it once.  It stays visible on purpose -- it is torch
telling the truth about memcnn's code, and silencing it would mean touching
the process-wide filters this module promises to leave alone (the iUNet's
memcnn engine below hides it only inside its own forward, where the user
cannot act on it).  The forward also frees the storage of the *caller's*
tensor, so pass it ``x * 1`` or ``x.clone()``, never a tensor you still need.

The second half of this module is the ``me_backend='memcnn'`` engine of
:class:`iunet_nb.iUNet`: :func:`apply_memcnn` wraps every operation of the
model's plan in ``memcnn.InvertibleModuleWrapper`` and runs them in order.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from iunet_nb import engine as eng
from iunet_nb import torch_internals as internals
from iunet_nb.engine.plan import CONCAT, SPLIT, Plan
from iunet_nb.nn.memcnn_library import import_memcnn

__all__ = ["import_memcnn", "apply_memcnn"]

# ---------------------------------------------------------------------------- the memcnn engine
class _MemcnnSafe(nn.Module):
    """Adapter that makes memcnn's recomputation replay the forward faithfully.

    memcnn runs the real forward under ``no_grad``; in the backward it calls
    ``inverse`` on the very output tensors of that forward and then the forward
    again with grad enabled.  memcnn itself replays the random state only for
    the inverse, and lets both recomputations update the module's buffers (so
    BatchNorm's running statistics would be updated two more times per step).
    Here the forward's random state is remembered per output tensor and
    replayed for the inverse and the recomputed forward, and both work on
    private copies of the buffers.
    """

    def __init__(self, fn: nn.Module, preserve_rng_state: bool) -> None:
        super().__init__()
        self.fn = fn
        self.preserve_rng_state = preserve_rng_state
        self._records: dict[int, dict] = {}
        self._pending: list[dict] = []

    def forward(self, *x: Tensor) -> Any:
        if torch.is_grad_enabled():  # memcnn's recomputation in the backward
            record = self._pending.pop() if self._pending else {}
            with eng.RecomputeContext(self.fn, record, self.preserve_rng_state):
                return self.fn(*x)
        record = eng.RecomputeContext.capture(self.fn, x[0], self.preserve_rng_state)
        out = self.fn(*x)
        # memcnn detaches its outputs in place, which torch refuses for views.
        out = tuple(map(_not_a_view, out)) if isinstance(out, tuple) else _not_a_view(out)
        first = out[0] if isinstance(out, tuple) else out
        key = id(first)
        self._records[key] = record
        weakref.finalize(first, self._records.pop, key, None)
        return out

    def inverse(self, *y: Tensor) -> Any:
        record = self._records.get(id(y[0]), {})
        with eng.RecomputeContext(self.fn, record, self.preserve_rng_state):
            x = self.fn.inverse(*y)
        self._pending.append(record)
        return x


def _not_a_view(t: Tensor) -> Tensor:
    """``t`` itself, or a non-view tensor sharing its storage (no copy)."""
    return t if t._base is None else eng.storage_alias(t)


def _guard_output(y: Tensor, parameters: Sequence[Tensor] = ()) -> Tensor:
    """Make the memcnn engine fail loudly where it would silently give wrong gradients.

    memcnn rebuilds every activation from the output tensor itself, so an
    in-place change of the output before ``backward`` (``y.add_(1)``) would
    corrupt all of them; its checkpoint function has no double backward; and
    it can back-propagate each forward only once (keeping what a second pass
    needs would keep every activation of the first one alive).  It also
    recomputes every step with the parameters as they are at the backward:
    where one was changed in place since the forward (an optimizer step between
    two forwards and their backwards, or inside a backward), plain autograd
    refuses, and so does this engine.  A hook on ``y`` checks all of it when
    the backward reaches it.
    """
    if not y.requires_grad:
        return y
    version = y._version
    parameters = [p for p in parameters if p.requires_grad]
    versions = [p._version for p in parameters]
    ref = weakref.ref(y)
    passes = [0]

    def check(grad: Tensor) -> None:
        if torch.is_grad_enabled():
            raise RuntimeError(eng.DOUBLE_BACKWARD_MESSAGE)
        passes[0] += 1
        if passes[0] > 1:
            raise RuntimeError(
                "me_backend='memcnn' can back-propagate through one forward only once (memcnn frees "
                "what a second backward would need). For backward(retain_graph=True) followed by "
                "another backward use me_backend='fused' (the default) or disable_custom_gradient=True, "
                "or run the forward again."
            )
        changed = [i for i, (p, v) in enumerate(zip(parameters, versions)) if p._version != v]
        if changed:
            p = parameters[changed[0]]
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: {len(changed)} parameter(s) of the iUNet (the first of shape {tuple(p.shape)}) "
                "changed after this forward (an optimizer step between the forward and its backward). "
                "me_backend='memcnn' recomputes with the current parameters, which would give wrong "
                "gradients; run backward before the next optimizer step, as with plain autograd."
            )
        out = ref()
        if out is not None and out._version != version:
            raise RuntimeError(
                "the iUNet's output was modified in place before backward() (its version went from "
                f"{version} to {out._version}); the memory-efficient engine rebuilds every activation from "
                "the output, so the gradients would be wrong. Modify a copy instead (y = y.clone() first) "
                "or use disable_custom_gradient=True."
            )

    y.register_hook(check)
    return y


def _walk(plan: Plan, modules: Sequence[nn.Module], x: Tensor,
          apply: Callable[..., Any]) -> Tensor:
    """Run the plan's operations with ``apply(module, *inputs)``; splits push the skip, concats pop it."""
    skips: list[Tensor] = []
    for op, module in zip(plan.ops, modules):
        if op.kind == SPLIT:
            kept, x = apply(module, x)
            skips.append(kept)
        elif op.kind == CONCAT:
            x = apply(module, skips.pop(), x)
        else:
            x = apply(module, x)
    return x


def apply_memcnn(plan: Plan, modules: Sequence[nn.Module], x: Tensor, preserve_rng_state: bool,
                 wrappers: dict[tuple[int, bool], nn.Module]) -> Tensor:
    """The body ``(N, C, *spatial) -> (N, C, *spatial)`` with every operation in memcnn's wrapper.

    ``modules[k]`` is the invertible module of ``plan.ops[k]`` (a split returns
    ``(kept, sent)`` copies, a concat takes ``(kept, sent)``).  ``wrappers``
    caches one ``memcnn.InvertibleModuleWrapper`` per module (keyed by
    ``(id(module), hooked)``) across calls.  The output carries a hook that refuses
    what memcnn would get wrong (see :func:`_guard_output`).
    """
    memcnn = import_memcnn()

    def wrap(module: nn.Module) -> nn.Module:
        # A module with hooks keeps its input: a hook may change values, so its input cannot
        # be rebuilt with its inverse (the backward recomputes it from the kept input).
        hooked = internals.module_has_hooks(module, recurse=False)
        key = (id(module), hooked)
        if key not in wrappers:
            wrappers[key] = memcnn.InvertibleModuleWrapper(
                fn=_MemcnnSafe(module, preserve_rng_state), keep_input=hooked,
                keep_input_inverse=False, preserve_rng_state=preserve_rng_state,
            )
        return wrappers[key]

    # memcnn frees each wrapper's input storage and assigns ``.grad`` of its inputs by
    # hand: never hand it the caller's tensor, give it a copy (freed at once).
    first = True

    def apply(module: nn.Module, *inputs: Tensor) -> Any:
        nonlocal first
        if first:
            inputs = tuple(t.clone() for t in inputs)
        out = wrap(module)(*inputs)
        first = False
        return out

    with warnings.catch_warnings():
        # memcnn frees storages with the deprecated ``Tensor.storage()``; torch's
        # one-time UserWarning about it says nothing the user can act on.
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
        y = _walk(plan, modules, x, apply)
    return _guard_output(y, [p for m in modules for p in m.parameters()])
