"""Memory-efficient backpropagation through a chain of invertible steps.

An iUNet body is written as a flat list of *steps* acting on a small state:
the current activation and a stack of skip activations (the channels each
level keeps).  Every step is invertible, so the backward pass can start from
the body's output alone and walk the steps in reverse, rebuilding each step's
input from its output while computing the gradients.

Two engines are built on this description:

``fused`` (:class:`FusedInvertibleFunction`)
    One autograd function over the whole body.  The forward runs without
    recording a graph and stores only the output.  In the backward, each
    additive coupling ``(u, v) -> (v, u + f(v))`` is undone *and*
    differentiated with a single evaluation of ``f``: ``f(v)`` is recomputed
    with grad enabled, subtracted in place to recover ``u`` and
    back-propagated for the parameter gradients (about 4 forward-equivalents
    per coupling; conventional backprop costs 3, memcnn's
    inverse-then-recompute 5).  Orthogonal kernels of the up/downsampling and
    channel mixing are computed without a graph in the forward and recomputed,
    with their graph, only inside their own backward step (:class:`KernelStep`).

``memcnn``
    Every step wrapped in ``memcnn.InvertibleModuleWrapper``, as in the paper.
    Built in :mod:`iunet_nb.arch.iunet`.

Activations are carried as lists of channel *parts* (views), so channel
splits and concatenations cost no copies, and a part is modified in place
only when the engine allocated it (never the caller's input, output or
incoming gradient).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Part",
    "private_buffers",
    "Step",
    "CouplingStep",
    "InvertibleModuleStep",
    "KernelStep",
    "SplitStep",
    "ConcatStep",
    "run_forward",
    "FusedInvertibleFunction",
]


#: The error for ``torch.autograd.grad(..., create_graph=True)`` through an engine.
DOUBLE_BACKWARD_MESSAGE = (
    "double backward (torch.autograd.grad(..., create_graph=True) or backward(create_graph=True), "
    "e.g. for a gradient penalty) is not supported by the memory-efficient engines, which do not "
    "record a graph of their backward. Build the model with disable_custom_gradient=True (or set "
    "model.disable_custom_gradient = True for that loss) to use plain autograd, which supports it."
)

#: Couplings whose f(v) is at least this large are recomputed slab by slab (one extra
#: convolution, no activation-sized buffer), and the finest level's downsampling hands
#: back its input in parts.  Below it, the saving is smaller than the weight-sized
#: temporaries of the coarse levels and not worth the time.
SLAB_MIN_BYTES = 8 << 20


@dataclass
class Part:
    """A channel slice of an activation; ``owned`` if the engine may modify it in place."""

    tensor: Tensor
    owned: bool

    @property
    def channels(self) -> int:
        return self.tensor.shape[1]


Parts = list[Part]


def num_channels(parts: Parts) -> int:
    return sum(p.channels for p in parts)


def narrow(parts: Parts, start: int, length: int) -> Parts:
    """Channels ``[start, start + length)`` of ``parts`` as views (no copy)."""
    out: Parts = []
    offset = 0
    end = start + length
    for p in parts:
        c = p.channels
        lo, hi = max(start, offset), min(end, offset + c)
        if lo < hi:
            t = p.tensor if (lo == offset and hi == offset + c) else p.tensor.narrow(1, lo - offset, hi - lo)
            out.append(Part(t, p.owned))
        offset += c
    return out


def full(parts: Parts) -> Part:
    """One tensor holding all channels of ``parts`` (a copy only if there are several parts)."""
    if len(parts) == 1:
        return parts[0]
    return Part(torch.cat([p.tensor for p in parts], dim=1), True)


@dataclass
class State:
    """Current activation plus the stack of skip activations."""

    cur: Parts
    stack: list[Parts] = field(default_factory=list)


class Step:
    """One invertible step.  ``tensors`` are the step's gradient-receiving inputs."""

    tensor_slice: slice = slice(0, 0)

    def tensors(self) -> list[Tensor]:
        """The tensors the step's gradients are taken for (none by default)."""
        return []

    def forward(self, st: State, tensors: Sequence[Tensor], record: dict) -> None:
        raise NotImplementedError

    def backward(self, st: State, gst: State, tensors: Sequence[Tensor],
                 record: dict) -> list[Tensor | None]:
        """Rebuild ``st`` (output -> input) and ``gst`` (grad output -> grad input).

        Returns the gradients of ``tensors`` (``None`` where not needed).
        """
        raise NotImplementedError


class private_buffers:
    """Context in which ``module`` (and its children) work on copies of their buffers.

    A recomputation must not update state such as BatchNorm's running
    statistics a second time (memcnn issue #12).  The copies may be saved by
    autograd and modified by the recomputation itself; the module's own
    buffers are put back untouched on exit.
    """

    def __init__(self, module: nn.Module, split_output: bool = False) -> None:
        self.module = module
        # At the finest level, a downsampling's backward may hand back its fine
        # tensors in parts (the slab-wise couplings there read parts directly).
        self.split_output = split_output

    def __enter__(self) -> "private_buffers":
        self._saved: list[tuple[dict, str, Tensor]] = []
        for m in self.module.modules():
            for name, b in m._buffers.items():
                if b is not None:
                    self._saved.append((m._buffers, name, b))
                    m._buffers[name] = b.detach().clone()
        return self

    def __exit__(self, *exc: Any) -> None:
        for buffers, name, b in self._saved:
            buffers[name] = b
        self._saved = []


class _RecomputeContext:
    """Replays the forward's RNG state, autocast state and module buffers."""

    def __init__(self, module: nn.Module, record: dict, preserve_rng_state: bool) -> None:
        self.module = module
        self.record = record
        self.preserve_rng_state = preserve_rng_state

    @staticmethod
    def capture(module: nn.Module, x: Tensor, preserve_rng_state: bool) -> dict:
        record: dict[str, Any] = {}
        if preserve_rng_state:
            record["cpu_rng"] = torch.get_rng_state()
            if x.is_cuda:
                record["cuda_device"] = x.device
                record["cuda_rng"] = torch.cuda.get_rng_state(x.device)
        return record

    def __enter__(self) -> None:
        self._stack: list[Any] = []
        swap = private_buffers(self.module)
        swap.__enter__()
        self._stack.append(swap)
        if self.preserve_rng_state and "cpu_rng" in self.record:
            devices = [self.record["cuda_device"]] if "cuda_device" in self.record else []
            fork = torch.random.fork_rng(devices=devices, enabled=True)
            fork.__enter__()
            self._stack.append(fork)
            torch.set_rng_state(self.record["cpu_rng"])
            if devices:
                torch.cuda.set_rng_state(self.record["cuda_rng"], devices[0])

    def __exit__(self, *exc: Any) -> None:
        for ctx in reversed(self._stack):
            ctx.__exit__(*exc)


def _params(module: nn.Module) -> list[Tensor]:
    return [p for p in module.parameters()]


class CouplingStep(Step):
    """Fused step for :class:`iunet_nb.nn.coupling.AdditiveCoupling` ``(u, v) -> (v, u + f(v))``."""

    def __init__(self, module: nn.Module, preserve_rng_state: bool = True, slabs: bool = False) -> None:
        self.module = module
        self.preserve_rng_state = preserve_rng_state
        # Recompute large activations in slabs (see SLAB_MIN_BYTES): one extra
        # convolution, no activation-sized buffer.
        self.slabs = slabs

    def tensors(self) -> list[Tensor]:
        return _params(self.module.f)

    def forward(self, st: State, tensors: Sequence[Tensor], record: dict) -> None:
        m = self.module
        s, c = m.split, m.channels
        u, v = narrow(st.cur, 0, s), narrow(st.cur, s, c - s)
        v_full = full(v)
        record.update(_RecomputeContext.capture(m.f, v_full.tensor, self.preserve_rng_state))
        fv = m.f(v_full.tensor)
        if len(u) == 1 and u[0].owned:
            u[0].tensor.add_(fv)
            new_u = u[0]
        else:
            new_u = Part(full(u).tensor + fv, True)
        # Keep v as the single (possibly concatenated) part, so the next
        # coupling, which transforms the other half, needs no copy.
        st.cur = [v_full, new_u]

    def backward(self, st: State, gst: State, tensors: Sequence[Tensor],
                 record: dict) -> list[Tensor | None]:
        m = self.module
        s, c = m.split, m.channels
        r = c - s
        y1, y2 = narrow(st.cur, 0, r), narrow(st.cur, r, s)
        dy1, dy2 = narrow(gst.cur, 0, r), narrow(gst.cur, r, s)
        params = list(tensors)
        wanted = [p for p in params if p.requires_grad]
        fused = getattr(m.f, "can_fuse_backward", None)
        if fused is not None and fused(y1[0].tensor) and all(p.requires_grad for p in params) \
                and len(params) == 3:
            u_bytes = sum(p.tensor.numel() * p.tensor.element_size() for p in y2)
            if (self.slabs and hasattr(m.f, "recompute_and_backward_slabs")
                    and u_bytes >= SLAB_MIN_BYTES):
                return self._backward_slabs(st, gst, y1, y2, dy1, dy2)
            v = full(y1)
            dy2_full = full(dy2)
            u = _owned_copy(y2[0]) if len(y2) == 1 else full(y2)  # full(): a new tensor
            grad_v = dy1[0].tensor if len(dy1) == 1 and dy1[0].owned else None
            # With an owned gradient buffer, dL/dv accumulates straight into it.
            dv, pgrads = m.f.recompute_and_backward(v.tensor, dy2_full.tensor, u.tensor, grad_v)
            if dv is None:
                dv_part = dy1[0]
            else:
                for piece, target in zip(dy1, _split_like(dv, dy1)):
                    target.add_(piece.tensor)
                dv_part = Part(dv, True)
            st.cur = [u, v]
            gst.cur = [dy2_full, dv_part]
            return list(pgrads)
        v = full(y1)
        dy2_full = full(dy2)
        # Buffers are restored only after the gradient: BatchNorm's backward reads them.
        with _RecomputeContext(m.f, record, self.preserve_rng_state):
            with torch.enable_grad():
                # An alias with its own version counter: u is rebuilt in place below,
                # possibly in the same storage as v, and that must not invalidate v_in.
                v_in = storage_alias(v.tensor).requires_grad_(True)
                fv = m.f(v_in)
            # Reconstruct u = y2 - f(v) first ...
            fv_data = fv.detach()
            if len(y2) == 1 and y2[0].owned:
                u = y2[0]
                u.tensor.sub_(fv_data)
            else:
                u = Part(full(y2).tensor - fv_data, True)
            del fv_data
            # ... then f(v) itself is no longer needed where its last layer's backward
            # does not read it (GroupNorm): release it before back-propagating.
            if getattr(m.f, "output_not_needed_for_backward", False) and fv._base is None:
                fv.untyped_storage().resize_(0)
            grads = torch.autograd.grad(fv, [v_in] + wanted, dy2_full.tensor.to(fv.dtype),
                                        allow_unused=True)
        del fv
        dv = grads[0]
        if dv is None:
            dv_part = full(dy1)
        else:
            dv = dv.to(dy2_full.tensor.dtype)
            for piece, target in zip(dy1, _split_like(dv, dy1)):
                target.add_(piece.tensor)
            dv_part = Part(dv, True)
        st.cur = [u, v]
        gst.cur = [dy2_full, dv_part]
        it = iter(grads[1:])
        return [next(it) if p.requires_grad else None for p in params]


    def _backward_slabs(self, st: State, gst: State, y1: Parts, y2: Parts, dy1: Parts,
                        dy2: Parts) -> list[Tensor | None]:
        """The coupling's backward slab by slab, on the channel parts as they are (no joins)."""
        u = [_owned_copy(p) for p in y2]
        grad_v = [p.tensor for p in dy1] if all(p.owned for p in dy1) else None
        dv, pgrads = self.module.f.recompute_and_backward_slabs(
            [p.tensor for p in y1], [p.tensor for p in dy2], [p.tensor for p in u], grad_v)
        if dv is None:
            dv_parts = dy1
        else:
            for piece, target in zip(dy1, _split_like(dv, dy1)):
                target.add_(piece.tensor)
            dv_parts = [Part(dv, True)]
        st.cur = u + y1
        gst.cur = dy2 + dv_parts
        return list(pgrads)


def storage_alias(t: Tensor) -> Tensor:
    """A detached tensor on ``t``'s memory with a version counter of its own."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def _owned_copy(p: Part) -> Part:
    return p if p.owned else Part(p.tensor.clone(), True)


def _split_like(t: Tensor, parts: Parts) -> list[Tensor]:
    out, offset = [], 0
    for p in parts:
        out.append(t.narrow(1, offset, p.channels))
        offset += p.channels
    return out


class InvertibleModuleStep(Step):
    """Any module with ``forward`` and ``inverse``: undo, then recompute with grad (memcnn-style)."""

    def __init__(self, module: nn.Module, preserve_rng_state: bool = True) -> None:
        self.module = module
        self.preserve_rng_state = preserve_rng_state

    def tensors(self) -> list[Tensor]:
        return _params(self.module)

    def forward(self, st: State, tensors: Sequence[Tensor], record: dict) -> None:
        x = full(st.cur).tensor
        record.update(_RecomputeContext.capture(self.module, x, self.preserve_rng_state))
        st.cur = [Part(self.module(x), True)]

    def backward(self, st: State, gst: State, tensors: Sequence[Tensor],
                 record: dict) -> list[Tensor | None]:
        y = full(st.cur).tensor
        dy = full(gst.cur).tensor
        params = list(tensors)
        wanted = [p for p in params if p.requires_grad]
        with _RecomputeContext(self.module, record, self.preserve_rng_state):
            x = self.module.inverse(y)
        with _RecomputeContext(self.module, record, self.preserve_rng_state):
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                y_re = self.module(x_in)
            grads = torch.autograd.grad(y_re, [x_in] + wanted, dy.to(y_re.dtype), allow_unused=True)
        dx = grads[0] if grads[0] is not None else torch.zeros_like(x)
        st.cur = [Part(x.detach(), True)]
        gst.cur = [Part(dx.to(dy.dtype), True)]
        it = iter(grads[1:])
        return [next(it) if p.requires_grad else None for p in params]


class KernelStep(Step):
    """An orthogonal linear step (resampling or channel mixing).

    The step's tensors are the module's parameters (the parametrisation's
    weight; none if the kernel is fixed), not the kernel: the kernel is
    computed without a graph in the forward and recomputed, with its graph,
    in the backward of this step only, so that no kernel and none of the
    Cayley/exp graphs live through the whole training step.

    The module must provide ``kernel()``, ``forward(x, kernel=...)`` and
    ``backward_parts(ys, dys, kernel, need_kernel_grad, y_owned, dy_owned)``, which
    rebuilds the input and its gradient from channel parts (the map is orthogonal,
    so the input gradient is the inverse applied to ``dy``); ``forward_parts`` is
    used when present.
    """

    def __init__(self, module: nn.Module, split_output: bool = False) -> None:
        self.module = module
        # At the finest level, a downsampling's backward may hand back its fine
        # tensors in parts (the slab-wise couplings there read parts directly).
        self.split_output = split_output

    def tensors(self) -> list[Tensor]:
        return _params(self.module)

    def forward(self, st: State, tensors: Sequence[Tensor], record: dict) -> None:
        kernel = self.module.kernel()
        if hasattr(self.module, "forward_parts"):
            out = self.module.forward_parts([p.tensor for p in st.cur], kernel,
                                            [p.owned for p in st.cur])
            st.cur = [Part(t, True) for t in out]
            return
        x = full(st.cur).tensor
        st.cur = [Part(self.module(x, kernel=kernel), True)]

    def backward(self, st: State, gst: State, tensors: Sequence[Tensor],
                 record: dict) -> list[Tensor | None]:
        params = list(tensors)
        wanted = [p for p in params if p.requires_grad]
        with torch.enable_grad():
            kernel = self.module.kernel()
        ys, dys = [p.tensor for p in st.cur], [p.tensor for p in gst.cur]
        y_owned, dy_owned = [p.owned for p in st.cur], [p.owned for p in gst.cur]
        st.cur, gst.cur = [], []  # hand the buffers over, so they can be freed early
        kwargs = {}
        if self.split_output:
            fine_bytes = sum(t.numel() * t.element_size() for t in ys)
            kwargs["join"] = fine_bytes < SLAB_MIN_BYTES
        need = bool(wanted) and kernel.requires_grad
        xs, dxs, dk = self.module.backward_parts(ys, dys, kernel.detach(), need,
                                                 y_owned, dy_owned, **kwargs)
        st.cur = [Part(t, True) for t in xs]
        gst.cur = [Part(t, True) for t in dxs]
        if not need or dk is None:
            return [None] * len(params)
        grads = iter(torch.autograd.grad(kernel, wanted, dk.to(kernel.dtype), allow_unused=True))
        return [next(grads) if p.requires_grad else None for p in params]


class SplitStep(Step):
    """Keep the first ``kept`` channels on the skip stack, send the rest on."""

    def __init__(self, kept: int) -> None:
        self.kept = kept

    def forward(self, st: State, tensors: Sequence[Tensor], record: dict) -> None:
        c = num_channels(st.cur)
        st.stack.append(narrow(st.cur, 0, self.kept))
        st.cur = narrow(st.cur, self.kept, c - self.kept)

    def backward(self, st: State, gst: State, tensors: Sequence[Tensor],
                 record: dict) -> list[Tensor | None]:
        st.cur = st.stack.pop() + st.cur
        gst.cur = gst.stack.pop() + gst.cur
        return []


class ConcatStep(Step):
    """Put the skip activation back in front of the current one."""

    def __init__(self, kept: int) -> None:
        self.kept = kept

    def forward(self, st: State, tensors: Sequence[Tensor], record: dict) -> None:
        st.cur = st.stack.pop() + st.cur

    def backward(self, st: State, gst: State, tensors: Sequence[Tensor],
                 record: dict) -> list[Tensor | None]:
        for s in (st, gst):
            c = num_channels(s.cur)
            # The skip part waits on the stack while the coarser levels are processed:
            # give it storage of its own, so the rest of its buffer can be freed then.
            s.stack.append([_compact(p) for p in narrow(s.cur, 0, self.kept)])
            s.cur = narrow(s.cur, self.kept, c - self.kept)
        return []


def _compact(part: Part) -> Part:
    """``part`` itself, or a copy of it if it is a view into a larger buffer."""
    t = part.tensor
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return Part(t.clone(), True)
    return part


def run_forward(steps: Sequence[Step], x: Tensor, tensors: Sequence[Tensor],
                records: list[dict] | None = None) -> Tensor:
    """Run ``steps`` on ``x`` (the caller's tensor is never modified); return the output."""
    st = State([Part(x, False)])
    for step in steps:
        record: dict = {}
        step.forward(st, tensors[step.tensor_slice], record)
        if records is not None:
            records.append(record)
    assert not st.stack, "unbalanced split/concat steps"
    out = full(st.cur)
    return out.tensor if out.owned else out.tensor.clone()


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

    ``apply(steps, x, *tensors)`` with ``x`` of shape ``(N, C, *spatial)`` and
    ``tensors`` the flat list of every step's gradient-receiving inputs
    (the parameters of the couplings and of the orthogonal parametrisations).
    """

    @staticmethod
    def forward(ctx: Any, steps: Sequence[Step], x: Tensor, *tensors: Tensor) -> Tensor:
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
        return y.to(ctx.autocast[1]) if ctx.autocast[0] else y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        y, *tensors = ctx.saved_tensors
        steps: Sequence[Step] = ctx.steps
        grads: list[Tensor | None] = [None] * len(tensors)
        st = State([Part(y, False)])
        gst = State([Part(dy.to(y.dtype), dy.dtype != y.dtype)])
        with torch.no_grad(), torch.autocast(ctx.device_type, enabled=False):
            for step, record in zip(reversed(steps), reversed(ctx.records)):
                sl = step.tensor_slice
                step_grads = step.backward(st, gst, tensors[sl], record)
                for i, g in zip(range(sl.start, sl.stop), step_grads):
                    if g is not None:
                        g = g.to(tensors[i].dtype)
                        early = _early_callback(tensors[i]) if EARLY_GRADIENTS else None
                        if early is None:
                            grads[i] = g
                        else:  # handed over now (e.g. an optimizer step), not at the end
                            early(tensors[i], g)
        st.cur = []  # the rebuilt input is not needed any more: free it before joining dx
        dx = full(gst.cur).tensor.to(ctx.x_meta[0])
        # ctx.records (RNG states) stay: backward(retain_graph=True) may come again.
        return (None, dx, *grads)


def apply_fused(steps: Sequence[Step], x: Tensor) -> Tensor:
    """``steps`` applied to ``x`` with memory-efficient backpropagation.

    ``x``: ``(N, C, *spatial)``.  Only the output is kept for the backward, which
    rebuilds every step's input from its output.  Each step's gradient-receiving
    tensors (``step.tensors()``) get their gradients.
    """
    tensors: list[Tensor] = []
    for step in steps:
        start = len(tensors)
        tensors += step.tensors()
        step.tensor_slice = slice(start, len(tensors))
    return FusedInvertibleFunction.apply(steps, x, *tensors)
