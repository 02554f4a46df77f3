"""The engine's channel-part helpers that let a level live in one buffer (ownership note 11).

``full`` returns the buffer that adjacent parts make up without copying; ``compact`` copies a
skip only when it holds at most half of its buffer; ``room_after`` finds the channels a split
left free; ``reunite`` puts the current channels there.  Values are checked against
``torch.cat``, memory against the buffers' addresses.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from iunet_nb.engine.parts import Part, State, compact, full, narrow, reunite, room_after


def _buffer(channels: int, batch: int = 1, spatial: tuple[int, ...] = (3, 4), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *spatial, generator=g, dtype=torch.float64)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@given(channels=st.integers(2, 9), cuts=st.lists(st.integers(1, 8), min_size=1, max_size=4),
       batch=st.integers(1, 3), owned=st.booleans())
def test_full_of_adjacent_parts_is_their_buffer(channels: int, cuts: list[int], batch: int, owned: bool) -> None:
    bounds = sorted({c for c in cuts if c < channels} | {0, channels})
    B = _buffer(channels, batch)
    parts = [Part(B[:, lo:hi], owned) for lo, hi in zip(bounds, bounds[1:])]
    whole = full(parts)
    assert torch.equal(whole.tensor, B) and _same_memory(whole.tensor, B)
    assert whole.owned == owned
    if len(parts) > 1:  # out of order: a new, owned tensor with the values in the parts' order
        swapped = parts[1:] + parts[:1]
        joined = full(swapped)
        assert torch.equal(joined.tensor, torch.cat([p.tensor for p in swapped], 1))
        assert joined.owned and not _same_memory(joined.tensor, B)


@given(channels=st.integers(2, 12), kept=st.integers(1, 11), batch=st.integers(1, 2))
def test_compact_copies_only_skips_that_hold_at_most_half(channels: int, kept: int, batch: int) -> None:
    kept = min(kept, channels - 1)
    B = _buffer(channels, batch)
    skip = narrow([Part(B, True)], 0, kept)
    out = compact(skip)
    assert torch.equal(torch.cat([p.tensor for p in out], 1), B[:, :kept])
    copied = not _same_memory(out[0].tensor, B)
    assert copied == (2 * kept <= channels), (kept, channels)


def test_compact_counts_every_part_of_the_skip_in_the_buffer() -> None:
    B = _buffer(16)
    skip = [Part(B[:, 0:8], True), Part(B[:, 8:12], True)]  # 12 of 16 channels: no copy
    assert all(_same_memory(p.tensor, B) for p in compact(skip))


def _split_state(channels: int, kept: int, batch: int = 1, owned: bool = True) -> tuple[State, torch.Tensor]:
    """A state right after a split whose sent-on channels went into a new tensor."""
    B = _buffer(channels, batch)
    cur = _buffer(channels - kept, batch, seed=1)
    return State([Part(cur, True)], stack=[[Part(B[:, :kept], owned)]]), B


@given(channels=st.integers(2, 9), kept=st.integers(1, 8), batch=st.integers(1, 3))
def test_room_after_a_split_is_the_sent_on_channels(channels: int, kept: int, batch: int) -> None:
    kept = min(kept, channels - 1)
    state, B = _split_state(channels, kept, batch)
    room = room_after(state)
    assert room is not None and _same_memory(room, B)
    assert room.shape == (batch, channels - kept, 3, 4) and room.storage_offset() == kept * 12


def test_no_room_when_the_skip_is_not_owned_or_something_lives_there() -> None:
    state, _ = _split_state(6, 4, owned=False)
    assert room_after(state) is None
    state, B = _split_state(6, 4)
    state.cur = [Part(B[:, 4:], True)]  # the split's own current part: not free yet
    assert room_after(state) is None
    state, B = _split_state(6, 4)
    state.stack.insert(0, [Part(B[:, 5:], True)])  # another part of the state lives in the room
    assert room_after(state) is None
    assert room_after(State([Part(_buffer(3), True)])) is None  # no skip at all


@given(channels=st.integers(2, 9), kept=st.integers(1, 8), batch=st.integers(1, 3), pieces=st.integers(1, 3))
def test_reunite_moves_the_current_channels_into_the_room(channels: int, kept: int, batch: int,
                                                          pieces: int) -> None:
    kept = min(kept, channels - 1)
    B = _buffer(channels, batch)
    skip_values = B[:, :kept].clone()
    cur_full = _buffer(channels - kept, batch, seed=1)
    cur = [Part(t, True) for t in torch.tensor_split(cur_full, min(pieces, channels - kept), dim=1)]
    out = reunite([Part(B[:, :kept], True)], cur, others=[])
    assert len(out) == 1 and _same_memory(out[0].tensor, B) and out[0].owned
    assert torch.equal(out[0].tensor, torch.cat([skip_values, cur_full], 1))


def test_reunite_of_the_room_itself_copies_nothing_and_merges_the_skip() -> None:
    B = _buffer(16)
    skip = [Part(B[:, 0:8], True), Part(B[:, 8:12], True)]
    room = B[:, 12:]
    room.fill_(3.0)
    out = reunite(skip, [Part(room, True)], others=[])
    assert len(out) == 1 and out[0].tensor.data_ptr() == B.data_ptr() and out[0].tensor.shape == B.shape
    assert (out[0].tensor[:, 12:] == 3.0).all()


@pytest.mark.parametrize("case", ["not owned", "wrong size", "other part inside", "skip after room"])
def test_reunite_leaves_everything_else_as_it_was(case: str) -> None:
    B = _buffer(6)
    before = B.clone()
    skip = [Part(B[:, :4], case != "not owned")]
    cur = [Part(_buffer(3 if case == "wrong size" else 2, seed=1), True)]
    others = [Part(B[:, 5:], True)] if case == "other part inside" else []
    if case == "skip after room":  # the skip's parts are not the buffer's first channels in order
        skip = [Part(B[:, 4:5], True), Part(B[:, 0:2], True)]
        cur = [Part(_buffer(2, seed=1), True)]
    out = reunite(skip, cur, others)
    assert len(out) == len(skip) + len(cur)
    assert torch.equal(B, before), "nothing may be written"


def test_one_sample_views_with_another_batch_stride_still_follow_each_other() -> None:
    """With one sample the batch stride says nothing about the memory: a slice of a buffer and
    the next channels seen as another level's tensor (as a resampling done in place leaves
    them) are adjacent, and a concatenation into the room they fill copies nothing.  With
    more samples the batch stride must match."""
    from iunet_nb.common import follows

    buf = torch.randn(1, 6, 4, 4)
    skip = buf[:, :2]
    rest = buf[:, 2:]
    other_level = rest.as_strided((1, 16, 2, 2), (1, 4, 2, 1), rest.storage_offset())
    seen_again = other_level.as_strided((1, 4, 4, 4), (7, 16, 4, 1), rest.storage_offset())
    assert follows(skip, seen_again)
    merged = reunite([Part(skip, True)], [Part(seen_again, True)], others=[])
    assert len(merged) == 1 and merged[0].tensor.data_ptr() == buf.data_ptr()
    assert torch.equal(merged[0].tensor, buf)
    two = torch.randn(2, 6, 4, 4)
    assert follows(two[:, :2], two[:, 2:])
    odd = two[:, 2:].as_strided((2, 4, 4, 4), (5 * 16, 16, 4, 1), two[:, 2:].storage_offset())
    assert not follows(two[:, :2], odd)


def test_fills_its_buffers_only_for_owned_parts_that_are_all_of_their_memory() -> None:
    """A resampling may leave its output in another layout in its input's memory only where
    that memory stays allocated anyway: all of a buffer (or a region the stack holds)."""
    from iunet_nb.engine.parts import fills_its_buffers

    buf, other = torch.randn(1, 6, 4, 4), torch.randn(2, 3, 4)
    assert fills_its_buffers([Part(buf[:, :2], True), Part(buf[:, 2:], True)])
    assert fills_its_buffers([Part(buf, True), Part(other, True)])
    assert not fills_its_buffers([Part(buf[:, 2:], True)])  # the rest of buf would stay alive
    assert not fills_its_buffers([Part(buf, False)])  # the caller's
    assert not fills_its_buffers([])
