"""Activations as lists of channel parts: the state the engine's steps act on.

An activation ``(N, C, *S)`` is carried as a list of :class:`Part` s, channel
slices ``(N, C_k, *S)`` whose concatenation along dim 1 is the activation, so
channel splits and concatenations cost no copies.  Which parts may be
modified in place is the ``owned`` flag; the rules are the ownership notes in
:mod:`iunet_nb.engine.contract`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "Part", "Parts", "State", "num_channels", "narrow", "full", "join", "split_like",
    "owned_copy", "compact", "storage_alias", "nbytes", "release_unreferenced",
    "move_out_of_consumed",
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


def full(parts: Parts) -> Part:
    """One part holding all channels of ``parts`` (a new, owned tensor if there are several)."""
    if len(parts) == 1:
        return parts[0]
    return Part(torch.cat([p.tensor for p in parts], dim=1), True)


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


def compact(part: Part) -> Part:
    """``part`` itself, or an owned copy if it is a view into a larger buffer (ownership note 6)."""
    t = part.tensor
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return Part(t.clone(), True)
    return part


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
        state.cur = [Part(p.tensor.clone(), True) if _lives_in(p.tensor, state.consumed) else p
                     for p in state.cur]
        release_unreferenced(state)
