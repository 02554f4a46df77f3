"""The engine's step types: one class per kind of invertible operation of an iUNet body.

* :class:`CouplingStep` -- an additive coupling ``(u, v) -> (v, u + f(v))``;
* :class:`InvertibleModuleStep` -- any module with ``forward`` and ``inverse``;
* :class:`KernelStep` -- an orthogonal map given by a kernel (channel mixing,
  invertible down- and upsampling);
* :class:`SplitStep` / :class:`ConcatStep` -- the skip connections.

Each implements the contract of :class:`~iunet_nb.engine.contract.Step`; the
ownership notes cited below are those of :mod:`iunet_nb.engine.contract`.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from iunet_nb import torch_internals as internals
from iunet_nb.engine.contract import DeclaredCouplingFunction, OrthogonalKernelModule, Step
from iunet_nb.engine.coupling_backward import add_block_output, add_block_output_slabwise, recompute_and_backward
from iunet_nb.engine.parts import (
    Part, Parts, State, compact, fills_its_buffers, full, held_region, join, move_out_of_consumed, narrow,
    nbytes, num_channels, owned_copy, relocate, reunite, room_after, split_like, storage_alias,
)

__all__ = [
    "SLAB_MIN_BYTES", "private_buffers", "RecomputeContext", "CouplingStep",
    "InvertibleModuleStep", "RecordedStep", "KernelStep", "SplitStep", "ConcatStep",
]

#: Couplings whose ``f(v)`` is at least this large are recomputed slab by slab (one extra
#: convolution, no activation-sized buffer), and the finest level's downsampling hands
#: back its input in parts.  Below it, the saving is smaller than the weight-sized
#: temporaries of the coarse levels and not worth the time.
SLAB_MIN_BYTES = 8 << 20


class private_buffers:
    """Context in which ``module`` (and its children) work on copies of their buffers.

    A recomputation must not update state such as BatchNorm's running
    statistics a second time (the forward already did).  The copies may be
    saved by autograd and modified by the recomputation itself; the module's
    own buffers are put back untouched on exit.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

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


def _rng_device(x: Tensor) -> torch.device | None:
    """The accelerator whose RNG state a recomputation on ``x`` must replay (None: CPU's only).

    The CPU generator is always replayed; ``meta`` tensors draw no random numbers.
    Any other device type (``cuda``, ``xpu``, ``mps``, ...) is handled through
    ``torch.get_device_module``, which must provide ``get_rng_state`` and
    ``set_rng_state``.
    """
    if x.device.type in ("cpu", "meta"):
        return None
    module = torch.get_device_module(x.device.type)
    if not (hasattr(module, "get_rng_state") and hasattr(module, "set_rng_state")):
        raise RuntimeError(
            f"cannot replay the RNG state of device type {x.device.type!r}: torch.{x.device.type} has no "
            "get_rng_state/set_rng_state; build the engine with preserve_rng_state=False (and no "
            "randomness in the recomputed modules) on this device")
    return x.device


class RecomputeContext:
    """Replays the forward's RNG state for ``module`` and gives it private buffers.

    ``record`` is what :meth:`capture` returned when the forward ran.  The states are
    those of the CPU generator and, when the input lives on an accelerator, of that
    device's default generator, read and restored through torch's device-generic
    helpers (``torch.get_device_module``, ``torch.random.fork_rng(device_type=...)``),
    so the same code serves CPU, CUDA and other back-ends.
    """

    def __init__(self, module: nn.Module, record: dict, preserve_rng_state: bool) -> None:
        self.module = module
        self.record = record
        self.preserve_rng_state = preserve_rng_state

    @staticmethod
    def capture(module: nn.Module, x: Tensor, preserve_rng_state: bool) -> dict:
        """The RNG states to replay (empty without ``preserve_rng_state``); ``x``: the input."""
        record: dict[str, Any] = {}
        if preserve_rng_state:
            record["cpu_rng"] = torch.get_rng_state()
            device = _rng_device(x)
            if device is not None:
                record["rng_device"] = device
                record["device_rng"] = torch.get_device_module(device.type).get_rng_state(device)
        return record

    def __enter__(self) -> None:
        self._exit = ExitStack()
        self._exit.enter_context(private_buffers(self.module))
        if self.preserve_rng_state and "cpu_rng" in self.record:
            device: torch.device | None = self.record.get("rng_device")
            # ``device_type`` is explicit: its default differs between torch versions
            # ("cuda" up to some 2.x, the current accelerator later).
            self._exit.enter_context(torch.random.fork_rng(
                devices=[] if device is None else [device], enabled=True,
                device_type="cpu" if device is None else device.type))
            torch.set_rng_state(self.record["cpu_rng"])
            if device is not None:
                torch.get_device_module(device.type).set_rng_state(self.record["device_rng"], device)

    def __exit__(self, *exc: Any) -> None:
        self._exit.__exit__(*exc)


def _gradients_for(tensors: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor | None]:
    """``grads`` (one per tensor that requires grad, in order) spread over all ``tensors``."""
    it = iter(grads)
    return [next(it) if t.requires_grad else None for t in tensors]


def _add_into_parts(grad: Tensor | None, parts: Parts) -> Parts:
    """``grad + cat(parts)`` as parts: ``parts`` themselves if ``grad`` is None (already added)."""
    if grad is None:
        return parts
    for piece, target in zip(parts, split_like(grad, parts)):
        target.add_(piece.tensor)
    return [Part(grad, True)]


class CouplingStep(Step):
    """Step for :class:`iunet_nb.nn.coupling.AdditiveCoupling` ``(u, v) -> (v, u + f(v))``.

    The backward recomputes ``f(v)`` once, subtracts it to rebuild ``u`` and
    back-propagates it: with the engine's fused kernel
    (:mod:`iunet_nb.engine.coupling_backward`) when ``f`` declares itself one
    conv -> LeakyReLU -> GroupNorm block (:class:`DeclaredCouplingFunction`),
    with autograd otherwise.

    Args:
        module: the coupling (``f``, ``channels``, ``split``).
        preserve_rng_state: replay the forward's RNG state when ``f`` is recomputed.
        slabs: recompute ``f`` slab by slab when ``u`` has at least
            :data:`SLAB_MIN_BYTES` (fused kernel only).
        slab_forward: compute ``f`` slab by slab in the forward too, on the same
            condition (:func:`~iunet_nb.engine.coupling_backward.add_block_output_slabwise`:
            one more convolution, no activation-sized temporary).
    """

    def __init__(self, module: nn.Module, preserve_rng_state: bool = True, slabs: bool = False,
                 slab_forward: bool = False) -> None:
        self.module = module
        self.preserve_rng_state = preserve_rng_state
        self.slabs = slabs
        self.slab_forward = slab_forward
        f = module.f
        self.block = f.fused_block() if isinstance(f, DeclaredCouplingFunction) else None

    def tensors(self) -> list[Tensor]:
        return self.block.tensors() if self.block is not None else list(self.module.f.parameters())

    def forward(self, st: State, tensors: Sequence[Tensor], record: dict) -> None:
        m = self.module
        s, c = m.split, m.channels
        u, v = narrow(st.cur, 0, s), narrow(st.cur, s, c - s)
        # The fused kernel has no graph: with grad mode on (the conformance check's
        # reference) f runs as the module it is.
        if self.block is not None and not torch.is_grad_enabled():
            # Neither v nor u is concatenated and f(v) gets no buffer of its own; v stays
            # in its parts, which the next coupling reads as they are.
            if self.slab_forward and nbytes(u) >= SLAB_MIN_BYTES:
                st.cur = self._slabwise_forward(u, v)
                return
            if not any(p.owned for p in st.cur):  # the caller's input: see _into_one_buffer
                st.cur = self._into_one_buffer(u, v)
                return
            out = add_block_output(self.block, [p.tensor for p in v], [p.tensor for p in u],
                                   len(u) == 1 and u[0].owned)
            st.cur = v + [Part(out, True)]
            return
        v_full = full(v)
        record.update(RecomputeContext.capture(m.f, v_full.tensor, self.preserve_rng_state))
        fv = m.f(v_full.tensor)
        if len(u) == 1 and u[0].owned:  # ownership note 2
            u[0].tensor.add_(fv)
            new_u = u[0]
        else:
            new_u = Part(join(u) + fv, True)
        # Keep v as the single (possibly concatenated) part, so the next
        # coupling, which transforms the other half, needs no copy.
        st.cur = [v_full, new_u]

    def _slabwise_forward(self, u: Parts, v: Parts) -> Parts:
        """``(v, u + f(v))`` with ``f(v)`` added into ``u``'s rows slab by slab.

        ``u`` is updated where it is owned; a state of the caller's is first copied into
        one new buffer laid out as :meth:`_into_one_buffer` leaves it.
        """
        if not any(p.owned for p in u + v):
            out, s = _level_buffer(u, v, copy_u=True)
            u = [Part(out.narrow(1, 0, s), True)]
            v = [Part(out.narrow(1, s, out.shape[1] - s), True)]
        else:
            u = [p if p.owned else owned_copy(p) for p in u]  # ownership note 3
        add_block_output_slabwise(self.block, [p.tensor for p in v], [p.tensor for p in u])
        return v + u

    def _into_one_buffer(self, u: Parts, v: Parts) -> Parts:
        """The output ``(v, u + f(v))`` of a state the step may not write into, in one new buffer.

        As two parts of one buffer (``u + f(v)`` where ``u`` was, then ``v``'s copy, as
        the in-place forward of an owned state leaves them), the level's later
        steps work in place and its output needs no concatenation at the end (ownership
        note 11); as ``v`` itself plus a new buffer for ``u + f(v)`` it would stay in
        two buffers up to the chain's output.
        """
        out, s = _level_buffer(u, v, copy_u=False)
        sum_ = add_block_output(self.block, [p.tensor for p in v], [p.tensor for p in u], False)
        out.narrow(1, 0, s).copy_(sum_)
        del sum_
        return [Part(out.narrow(1, s, out.shape[1] - s), True), Part(out.narrow(1, 0, s), True)]

    def backward(self, st: State, gst: State, tensors: Sequence[Tensor],
                 record: dict) -> list[Tensor | None]:
        r = self.module.channels - self.module.split
        s = self.module.split
        y1, y2 = narrow(st.cur, 0, r), narrow(st.cur, r, s)
        dy1, dy2 = narrow(gst.cur, 0, r), narrow(gst.cur, r, s)
        if self.block is not None:
            return self._fused_backward(st, gst, y1, y2, dy1, dy2, tensors)
        return self._autograd_backward(st, gst, y1, y2, dy1, dy2, tensors, record)

    def _fused_backward(self, st: State, gst: State, y1: Parts, y2: Parts, dy1: Parts, dy2: Parts,
                        tensors: Sequence[Tensor]) -> list[Tensor | None]:
        """``u = y2 - f(y1)`` and the gradients with the fused kernel, slab-wise for large ``u``."""
        slabbed = self.slabs and nbytes(y2) >= SLAB_MIN_BYTES
        if slabbed:  # the kernel reads and updates the parts as they are
            v, u = y1, [owned_copy(p) for p in y2]
        else:
            v, dy2 = [full(y1)], [full(dy2)]
            u = [owned_copy(full(y2))]  # ownership note 3
        # With owned gradient buffers, dL/dv accumulates straight into them (note 2).
        accumulate = all(p.owned for p in dy1) and (slabbed or len(dy1) == 1)
        dv, grads = recompute_and_backward(
            self.block, [p.tensor for p in v], [p.tensor for p in dy2], [p.tensor for p in u],
            [p.tensor for p in dy1] if accumulate else None, slabs=slabbed)
        st.cur = u + v
        gst.cur = dy2 + _add_into_parts(dv, dy1)
        return [g if t.requires_grad else None for t, g in zip(tensors, grads)]

    def _autograd_backward(self, st: State, gst: State, y1: Parts, y2: Parts, dy1: Parts,
                           dy2: Parts, tensors: Sequence[Tensor], record: dict) -> list[Tensor | None]:
        """``u = y2 - f(y1)`` and the gradients with one recomputation of ``f`` under autograd."""
        f = self.module.f
        v, dy2_full = full(y1), full(dy2)
        wanted = [t for t in tensors if t.requires_grad]
        # Buffers are restored only after the gradient: BatchNorm's backward reads them.
        with RecomputeContext(f, record, self.preserve_rng_state):
            with torch.enable_grad():
                # u is rebuilt in place below, possibly in v's storage (ownership note 5).
                v_in = storage_alias(v.tensor).requires_grad_(True)
                fv = f(v_in)
            fv_data = fv.detach()
            if len(y2) == 1 and y2[0].owned:  # ownership note 2
                u = y2[0]
                u.tensor.sub_(fv_data)
            else:
                u = Part(join(y2) - fv_data, True)
            del fv_data
            if isinstance(f, DeclaredCouplingFunction) and f.output_not_needed_for_backward \
                    and fv._base is None:
                fv.untyped_storage().resize_(0)
            grads = torch.autograd.grad(fv, [v_in] + wanted, dy2_full.tensor.to(fv.dtype),
                                        allow_unused=True)
        del fv
        dv = None if grads[0] is None else grads[0].to(dy2_full.tensor.dtype)
        st.cur = [u, v]
        gst.cur = [dy2_full] + (_add_into_parts(dv, dy1) if dv is not None else [full(dy1)])
        return _gradients_for(tensors, grads[1:])


class InvertibleModuleStep(Step):
    """Any module with ``forward`` and ``inverse``: undo, then recompute with grad (memcnn-style)."""

    def __init__(self, module: nn.Module, preserve_rng_state: bool = True) -> None:
        self.module = module
        self.preserve_rng_state = preserve_rng_state

    def tensors(self) -> list[Tensor]:
        return list(self.module.parameters())

    def forward(self, st: State, tensors: Sequence[Tensor], record: dict) -> None:
        x = join(st.cur)
        record.update(RecomputeContext.capture(self.module, x, self.preserve_rng_state))
        st.cur = [Part(self.module(x), True)]

    def backward(self, st: State, gst: State, tensors: Sequence[Tensor],
                 record: dict) -> list[Tensor | None]:
        y, dy = join(st.cur), join(gst.cur)
        wanted = [t for t in tensors if t.requires_grad]
        with RecomputeContext(self.module, record, self.preserve_rng_state):
            x = self.module.inverse(y)
        with RecomputeContext(self.module, record, self.preserve_rng_state):
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                y_re = self.module(x_in)
            grads = torch.autograd.grad(y_re, [x_in] + wanted, dy.to(y_re.dtype), allow_unused=True)
        dx = grads[0] if grads[0] is not None else torch.zeros_like(x)
        st.cur = [Part(x.detach(), True)]
        gst.cur = [Part(dx.to(dy.dtype), True)]
        return _gradients_for(tensors, grads[1:])


class RecordedStep(Step):
    """A module called as itself with autograd in the forward, its graph kept for the backward.

    For modules that the engine must not rebuild from their output: those with hooks
    (a hook may change values, and fires here exactly as in plain autograd: forward
    hooks once in the forward, backward hooks in the backward).  The step costs what
    conventional backpropagation costs for this module (its graph and a copy of its
    input); the rest of the chain stays memory-efficient.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def tensors(self) -> list[Tensor]:
        return list(self.module.parameters())

    def forward(self, st: State, tensors: Sequence[Tensor], record: dict) -> None:
        x = full(st.cur).tensor
        with torch.enable_grad():
            # A copy: later steps may write into the memory x lives in (ownership note 11).
            x_in = x.detach().clone().requires_grad_(True)
            y = self.module(x_in)
        record["graph"] = (x_in, y)
        # Not owned: y's memory may be saved by its own graph (ownership note 1).
        st.cur = [Part(y.detach(), False)]

    def backward(self, st: State, gst: State, tensors: Sequence[Tensor],
                 record: dict) -> list[Tensor | None]:
        x_in, y = record["graph"]
        dy = full(gst.cur).tensor
        st.cur, gst.cur = [], []
        keep = internals.graph_is_kept()
        wanted = [t for t in tensors if t.requires_grad]
        grads = torch.autograd.grad(y, [x_in] + wanted, dy.to(y.dtype), retain_graph=keep,
                                    allow_unused=True)
        if not keep:  # this backward runs once: the graph can go now (note 8)
            del record["graph"]
        dx = grads[0] if grads[0] is not None else torch.zeros_like(x_in)
        st.cur = [Part(x_in.detach(), False)]
        gst.cur = [Part(dx.to(dy.dtype), True)]
        return _gradients_for(tensors, grads[1:])


class KernelStep(Step):
    """An :class:`~iunet_nb.engine.contract.OrthogonalKernelModule` (resampling or channel mixing).

    The step's tensors are the module's parameters (the parametrisation's
    weight; none if the kernel is fixed), not the kernel: the kernel is
    computed without a graph in the forward and recomputed, with its graph,
    in the backward of this step only, so that no kernel and none of the
    Cayley/exp graphs live through the whole training step.

    ``split_output``: the module may hand back its input in several parts
    (``allow_split``) when it is at least :data:`SLAB_MIN_BYTES` -- used at
    the finest level, where the slab-wise couplings read parts directly.
    """

    def __init__(self, module: nn.Module, split_output: bool = False) -> None:
        if not isinstance(module, OrthogonalKernelModule):
            raise TypeError(f"KernelStep needs an OrthogonalKernelModule, got {type(module).__name__}")
        self.module = module
        self.split_output = split_output

    def tensors(self) -> list[Tensor]:
        return list(self.module.parameters())

    def forward(self, st: State, tensors: Sequence[Tensor], record: dict) -> None:
        room, region = room_after(st), held_region(st)  # ownership note 11
        out = self.module.forward_parts([p.tensor for p in st.cur], self.module.kernel(),
                                        [p.owned for p in st.cur], out=room,
                                        in_place=region is not None or fills_its_buffers(st.cur))
        st.cur = _moved_into(out, region if room is None else None)

    def backward(self, st: State, gst: State, tensors: Sequence[Tensor],
                 record: dict) -> list[Tensor | None]:
        wanted = [t for t in tensors if t.requires_grad]
        with torch.enable_grad():
            kernel = self.module.kernel()
        allow_split = self.split_output and nbytes(st.cur) >= SLAB_MIN_BYTES
        ys, dys = [p.tensor for p in st.cur], [p.tensor for p in gst.cur]
        y_owned, dy_owned = [p.owned for p in st.cur], [p.owned for p in gst.cur]
        x_out, dx_out = room_after(st), room_after(gst)  # ownership note 11
        region, dregion = held_region(st), held_region(gst)
        x_in_place = region is not None or fills_its_buffers(st.cur)
        dx_in_place = dregion is not None or fills_its_buffers(gst.cur)
        st.cur, gst.cur = [], []  # hand the buffers over, so they can be freed early (note 7)
        need = bool(wanted) and kernel.requires_grad
        # x moves into the memory y left before anything of dL/dx exists (note 11)
        x_region = region if x_out is None else None
        xs, dxs, dk = self.module.backward_parts(
            ys, dys, kernel.detach(), need, y_owned, dy_owned, allow_split, x_out=x_out, dx_out=dx_out,
            place_x=lambda parts: [p.tensor for p in _moved_into(parts, x_region)],
            x_in_place=x_in_place, dx_in_place=dx_in_place)
        st.cur = _moved_into(xs, x_region)
        gst.cur = _moved_into(dxs, dregion if dx_out is None else None)
        if not need or dk is None:
            return [None] * len(tensors)
        grads = torch.autograd.grad(kernel, wanted, dk.to(kernel.dtype), allow_unused=True)
        return _gradients_for(tensors, grads)


def _level_buffer(u: Parts, v: Parts, copy_u: bool) -> tuple[Tensor, int]:
    """``(buffer, s)``: a new ``(N, s + c_v, *S)`` tensor with ``v`` copied into its last channels
    (and ``u`` into its first ``s`` with ``copy_u``), laid out as the in-place forward of a
    coupling leaves a level: ``u + f(v)`` where ``u`` was, then ``v``."""
    s = num_channels(u)
    first = v[0].tensor
    out = first.new_empty(first.shape[0], s + num_channels(v), *first.shape[2:])
    offset = 0 if copy_u else s
    for p in (u + v if copy_u else v):
        out.narrow(1, offset, p.channels).copy_(p.tensor)
        offset += p.channels
    return out, s


def _moved_into(out: list[Tensor], region: Tensor | None) -> Parts:
    """A kernel step's output as owned parts, moved into ``region`` when it fits (note 11).

    ``region``: the step's input, a slice of a buffer the skip stack holds
    (:func:`~iunet_nb.engine.parts.held_region`), free now that the output exists; moving
    the output there frees the output's own memory instead of holding the slice dead.
    """
    if region is not None:
        moved = relocate(out, region)
        if moved is not None:
            return [Part(moved, True)]
    return [Part(t, True) for t in out]


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
        for s in (st, gst):  # the rebuilt channels go back into the skip's buffer if they can
            skip = s.stack.pop()
            s.cur = reunite(skip, s.cur, others=s.all_parts())
        return []


class ConcatStep(Step):
    """Put the skip activation (``kept`` channels) back in front of the current one."""

    def __init__(self, kept: int) -> None:
        self.kept = kept

    def forward(self, st: State, tensors: Sequence[Tensor], record: dict) -> None:
        # The skip's buffer usually still has the room the split sent on: fill it (no
        # concatenation later, and that room is not held for nothing).
        skip = st.stack.pop()
        st.cur = reunite(skip, st.cur, others=st.all_parts())

    def backward(self, st: State, gst: State, tensors: Sequence[Tensor],
                 record: dict) -> list[Tensor | None]:
        for s in (st, gst):  # one state after the other: at most one extra buffer at a time
            c = num_channels(s.cur)
            held = [p for parts in s.stack for p in parts]
            s.stack.append(compact(narrow(s.cur, 0, self.kept), others=held))  # ownership note 6
            s.cur = narrow(s.cur, self.kept, c - self.kept)
            move_out_of_consumed(s)  # ownership note 9
        return []
