"""Activations as lists of channel parts: the state the engine's steps act on.

An activation ``(N, C, *S)`` is carried as a list of :class:`Part` s, channel
slices ``(N, C_k, *S)`` whose concatenation along dim 1 is the activation, so
channel splits and concatenations cost no copies.  Which parts may be
modified in place is the ``owned`` flag; the rules are the ownership notes in
:mod:`iunet_nb.engine.contract`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from iunet_nb.common import dense_strides, follows, per_sample_view, same_strides

__all__ = [
    "Part", "Parts", "State", "num_channels", "narrow", "full", "join", "split_like",
    "owned_copy", "compact", "storage_alias", "nbytes", "release_unreferenced",
    "move_out_of_consumed", "whole_buffer", "room_after", "reunite", "held_region", "relocate",
]


@dataclass
class Part:
    """A channel slice ``(N, C_k, *S)`` of an activation; ``owned``: see ownership note 2."""

    tensor: Tensor
    owned: bool

    @property
    def channels(self) -> int:
        return self.tensor.shape[1]


Parts = list[Part]


@dataclass
class State:
    """The current activation ``cur`` and the stack of skip activations (bottom first).

    As one tensor, a state is ``cat(stack[0] + ... + stack[-1] + cur, dim=1)``.
    ``consumed``: the caller's tensors whose memory this state took over in the
    consuming mode; each is freed as soon as no part refers to it (ownership note 9).
    """

    cur: Parts
    stack: list[Parts] = field(default_factory=list)
    consumed: list[Tensor] = field(default_factory=list)

    def all_parts(self) -> Parts:
        """Every part, in the order of the state as one tensor (see the class docstring)."""
        return [p for parts in self.stack for p in parts] + list(self.cur)


def num_channels(parts: Parts) -> int:
    return sum(p.channels for p in parts)


def nbytes(parts: Parts) -> int:
    """Bytes held by the parts' elements."""
    return sum(p.tensor.numel() * p.tensor.element_size() for p in parts)


def narrow(parts: Parts, start: int, length: int) -> Parts:
    """Channels ``[start, start + length)`` of ``parts`` as views (no copy; ownership kept)."""
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


def whole_buffer(t: Tensor, channels: int) -> Tensor | None:
    """The dense ``(N, channels, *S)`` tensor whose leading channels are ``t``, if ``t``'s memory is exactly that.

    ``t``: ``(N, C_k, *S)`` with ``C_k <= channels``, a channel slice starting at channel 0
    of a contiguous buffer of ``channels`` channels that is the whole of its storage.
    Returns None for any other ``t`` (another offset, layout or storage size).
    """
    n, spatial = t.shape[0], t.shape[2:]
    inner = math.prod(spatial)
    shape = (n, channels, *spatial)
    dense = dense_strides(shape)
    if (t.storage_offset() != 0 or t.stride()[1:] != dense[1:] or (n > 1 and t.stride(0) != dense[0])
            or t.untyped_storage().nbytes() != n * channels * inner * t.element_size()):
        return None
    return t.as_strided(shape, dense, 0)


def _adjacent_in_one_buffer(parts: Parts) -> Tensor | None:
    """The buffer that ``parts`` are, in order and without gaps, or None."""
    whole = whole_buffer(parts[0].tensor, num_channels(parts))
    if whole is None or not all(follows(a.tensor, b.tensor) for a, b in zip(parts, parts[1:])):
        return None
    return whole


def full(parts: Parts) -> Part:
    """One part holding all channels of ``parts``.

    The part itself if there is one; the buffer they make up if they are its channels
    in order (no copy); else a new, owned tensor.
    """
    if len(parts) == 1:
        return parts[0]
    whole = _adjacent_in_one_buffer(parts)
    if whole is not None:
        return Part(whole, all(p.owned for p in parts))
    return Part(torch.cat([p.tensor for p in parts], dim=1), True)


def _buffer_of(t: Tensor) -> tuple[Tensor, int] | None:
    """``(buffer, first channel)`` if ``t`` is a channel slice of a dense buffer that is all of its storage."""
    n, spatial = t.shape[0], t.shape[2:]
    inner = math.prod(spatial)
    elements = t.untyped_storage().nbytes() // t.element_size()
    if inner == 0 or elements % (n * inner) or t.storage_offset() % inner:
        return None
    channels = elements // (n * inner)
    first = t.storage_offset() // inner
    whole = whole_buffer(t.as_strided(t.shape, t.stride(), 0), channels) if first < channels else None
    return None if whole is None else (whole, first)


def _merge_adjacent(parts: Parts) -> Parts:
    """``parts`` with neighbours that are consecutive channels of one buffer joined into one view."""
    out: Parts = []
    for p in parts:
        if out and follows(out[-1].tensor, p.tensor):
            prev = out[-1].tensor
            shape = (prev.shape[0], prev.shape[1] + p.channels, *prev.shape[2:])
            out[-1] = Part(prev.as_strided(shape, prev.stride(), prev.storage_offset()),
                           out[-1].owned and p.owned)
        else:
            out.append(p)
    return out


def _room(skip: Parts) -> tuple[Tensor, int] | None:
    """``(buffer, first spare channel)``: the buffer ``skip``'s last (owned) part is a slice of."""
    if not skip or not skip[-1].owned:
        return None
    last = skip[-1].tensor
    found = _buffer_of(last)
    if found is None:
        return None
    whole, first = found
    spare = first + last.shape[1]
    for p in skip[:-1]:  # the room is the buffer's last channels: no other skip part there
        other = _buffer_of(p.tensor) if _lives_in(p.tensor, [whole]) else None
        if other is not None and other[1] >= first:
            return None
    return (whole, spare) if spare < whole.shape[1] else None


def room_after(state: State) -> Tensor | None:
    """The free channels after the top skip of ``state`` in its buffer, as a view, or None.

    A split keeps the first channels of a buffer on the stack and sends the rest on;
    once the rest has been transformed into a new tensor, those channels are free
    (nothing else lives in the buffer: checked against every other part of the
    state).  A step whose output has exactly that shape may write it there; the
    concatenation that follows (:func:`reunite`) then costs nothing.
    """
    if not state.stack:
        return None
    found = _room(state.stack[-1])
    if found is None:
        return None
    whole, spare = found
    others = list(state.cur) + [p for parts in state.stack[:-1] for p in parts]
    if any(_lives_in(p.tensor, [whole]) for p in others):
        return None
    return whole.narrow(1, spare, whole.shape[1] - spare)


def held_region(state: State) -> Tensor | None:
    """The memory of the current activation, if its owned parts are one slice of a buffer the skip stack also holds.

    Such a slice is free once a step has turned it into a new tensor, but its buffer
    stays (the skip holds it): the step's output can then move there (:func:`relocate`)
    instead of holding memory of its own (ownership note 11).
    """
    if not state.cur or not all(p.owned for p in state.cur):
        return None
    found = [_buffer_of(p.tensor) for p in state.cur]
    if any(f is None for f in found):
        return None
    whole = found[0][0]
    if any(not _lives_in(p.tensor, [whole]) for p in state.cur):
        return None
    spans = sorted((first, first + p.channels) for (_, first), p in zip(found, state.cur))
    if any(hi != lo for (_, hi), (lo, _) in zip(spans, spans[1:])):  # one run of channels
        return None
    region = whole.narrow(1, spans[0][0], spans[-1][1] - spans[0][0])
    if region.numel() == whole.numel():
        return None
    held = [p.tensor for parts in state.stack for p in parts]
    return region if _lives_in(region, held) else None


def fills_its_buffers(parts: Parts) -> bool:
    """Whether ``parts`` are owned and all of the memory of the buffers they live in.

    A step may then leave its output in that memory even in another layout: nothing
    else of those buffers would stay alive with it (ownership note 11).
    """
    used: dict[int, int] = {}
    size: dict[int, int] = {}
    for p in parts:
        if not p.owned:
            return False
        key = p.tensor.untyped_storage().data_ptr()
        used[key] = used.get(key, 0) + p.tensor.numel() * p.tensor.element_size()
        size[key] = p.tensor.untyped_storage().nbytes()
    return bool(parts) and all(used[k] == size[k] for k in used)


def relocate(out: Tensor | Sequence[Tensor], region: Tensor) -> Tensor | None:
    """``out`` copied into ``region`` (a free slice, see :func:`held_region`), or None if it does not fit.

    ``out``: ``(N, C', *S')`` with as many elements per sample as ``region``, or channel
    parts ``(N, C_k, *S')`` of such a tensor, copied one after the other (the result is
    then their concatenation); the copy is laid out densely per sample, at ``region``'s
    place in each sample of its buffer.
    """
    parts = [out] if isinstance(out, Tensor) else list(out)
    first = parts[0]
    shape = (first.shape[0], sum(t.shape[1] for t in parts), *first.shape[2:])
    if (any(t.shape[0] != shape[0] or t.shape[2:] != first.shape[2:] or t.dtype != region.dtype
            for t in parts) or math.prod(shape) != region.numel() or shape[0] != region.shape[0]
            or any(_lives_in(t, [region]) for t in parts)):
        return None
    dst = per_sample_view(region, shape)
    offset = 0
    for t in parts:
        dst.narrow(1, offset, t.shape[1]).copy_(t)
        offset += t.shape[1]
    return dst


def _is_view(t: Tensor, view: Tensor) -> bool:
    """Whether ``t`` is exactly the elements of ``view`` (same memory, offset, shape, strides;
    the batch stride only with more than one sample)."""
    return (t.untyped_storage().data_ptr() == view.untyped_storage().data_ptr()
            and t.storage_offset() == view.storage_offset() and t.shape == view.shape
            and same_strides(t, view))


def reunite(skip: Parts, cur: Parts, others: Parts) -> Parts:
    """``skip + cur`` with ``cur`` in the free rest of the buffer ``skip`` ends in.

    When a level's activation was split (the skip kept, the rest sent on), the skip's
    last part is often a slice of a buffer whose last channels nothing uses any more.
    If that buffer is owned and has exactly ``cur``'s channels to spare after the slice,
    and no part of ``cur`` or ``others`` (every other part alive) lives in it, ``cur`` is
    copied there (``cur``'s own buffers are freed when the caller drops them); if ``cur``
    already is that room (:func:`room_after`), nothing is copied.  The skip's parts in
    that buffer then become one view: no half-dead buffer is held and no concatenation
    is needed later.  Otherwise ``skip + cur`` unchanged.
    """
    found = _room(skip) if cur else None
    if found is None:
        return skip + cur
    whole, spare = found
    room = whole.narrow(1, spare, whole.shape[1] - spare)
    first = spare - skip[-1].channels  # where skip's last part starts
    if not (len(cur) == 1 and cur[0].owned and _is_view(cur[0].tensor, room)):
        if (num_channels(cur) != room.shape[1] or room.shape[2:] != cur[0].tensor.shape[2:]
                or any(_lives_in(p.tensor, [whole]) for p in list(cur) + list(others))):
            return skip + cur
        offset = 0
        for p in cur:
            room.narrow(1, offset, p.channels).copy_(p.tensor)
            offset += p.channels
    grown = Part(whole.narrow(1, first, whole.shape[1] - first), True)
    return _merge_adjacent(skip[:-1] + [grown])


def join(parts: Parts) -> Tensor:
    """The tensor of :func:`full` (the input itself for a single part)."""
    return full(parts).tensor


def split_like(t: Tensor, parts: Parts) -> list[Tensor]:
    """Views of ``t`` cut at the channel boundaries of ``parts``."""
    out, offset = [], 0
    for p in parts:
        out.append(t.narrow(1, offset, p.channels))
        offset += p.channels
    return out


def owned_copy(p: Part) -> Part:
    """``p`` itself if owned, else an owned copy (ownership note 3)."""
    return p if p.owned else Part(p.tensor.clone(), True)


def compact(parts: Parts, others: Parts = ()) -> Parts:
    """``parts``, with owned copies of those that share a larger buffer (ownership note 6).

    Parts that together hold more than half of their buffer stay views: copying them
    would cost more than the rest of the buffer it lets go.  So do parts in a buffer
    that one of ``others`` (the rest of the state) lives in: copying frees nothing.
    """
    kept = {p.tensor.untyped_storage().data_ptr() for p in others}
    held: dict[int, int] = {}
    for p in parts:
        ptr = p.tensor.untyped_storage().data_ptr()
        held[ptr] = held.get(ptr, 0) + p.tensor.numel() * p.tensor.element_size()
    out = []
    for p in parts:
        storage = p.tensor.untyped_storage()
        copy = storage.data_ptr() not in kept and storage.nbytes() >= 2 * held[storage.data_ptr()]
        out.append(Part(p.tensor.clone(), True) if copy else p)
    return out


def storage_alias(t: Tensor) -> Tensor:
    """A detached tensor on ``t``'s memory with a version counter of its own (ownership note 5)."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def _lives_in(t: Tensor, buffers: Sequence[Tensor]) -> bool:
    """Whether ``t`` shares its memory with one of ``buffers``."""
    ptr = t.untyped_storage().data_ptr()
    return any(b.untyped_storage().data_ptr() == ptr for b in buffers)


def release_unreferenced(state: State, keep: Sequence[Tensor] = ()) -> None:
    """Free the memory of each of ``state.consumed`` that no part refers to any more (note 9).

    ``keep``: tensors outside the state whose memory must stay (the input gradient).
    """
    if not state.consumed:
        return
    users = [p.tensor for p in state.all_parts()] + list(keep)
    kept = []
    for buffer in state.consumed:
        if _lives_in(buffer, users):
            kept.append(buffer)
        else:
            buffer.untyped_storage().resize_(0)
    state.consumed = kept


def move_out_of_consumed(state: State) -> None:
    """Copy the current parts that live in a consumed buffer, then free what is unreferenced.

    Used where the skip parts have just been compacted (note 6): the rest of
    the consumed buffer is then held by ``cur`` alone, and copying it lets the
    whole buffer go now instead of after the next step (note 9).
    """
    if state.consumed:
        held = [p.tensor for parts in state.stack for p in parts]  # these stay whatever we copy
        movable = [b for b in state.consumed if not _lives_in(b, held)]
        state.cur = [Part(p.tensor.clone(), True) if _lives_in(p.tensor, movable) else p
                     for p in state.cur]
        release_unreferenced(state)
