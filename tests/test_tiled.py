"""Tiled 3^dim convolutions: same numbers as torch, bounded working memory on CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from iunet_nb.measure.meter import _profiler_running_total
from iunet_nb.nn.tiled import conv3_tiled, conv3_transpose_tiled, conv3_weight_grad_tiled, conv_tile_bounds


def _peak(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    return _profiler_running_total(prof)[0]


@pytest.mark.parametrize("shape", [(1, 8, 48, 48, 48), (2, 4, 9, 10, 11), (1, 32, 64, 64), (1, 3, 50)])
def test_tiles_cover_every_row_once(shape) -> None:
    for dtype in (torch.float32, torch.float64):
        bounds = conv_tile_bounds(shape, dtype, torch.device("cpu"), tile_elements=4096)
        assert bounds[0][0] == 0 and bounds[-1][1] == shape[2]
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(bounds, bounds[1:]))


def test_native_path_tiles_account_for_the_unfolded_columns() -> None:
    """Batch 1, 8 channels, 48^3: in float32 a slab too small for oneDNN is convolved as a batch of
    its 3-row windows (3x the slab, copied once more by oneDNN; at least 2 rows); in float64 (no
    oneDNN) ATen's native path
    unfolds 27x, and the tiles shrink to match."""
    shape = (1, 8, 48, 48, 48)
    plane = 8 * 48 * 48
    rows32 = [hi - lo for lo, hi in conv_tile_bounds(shape, torch.float32, torch.device("cpu"))]
    assert min(rows32) >= 2 and max(rows32) * 6 * plane <= max(1 << 19, 2 * 6 * plane)
    rows64 = [hi - lo for lo, hi in conv_tile_bounds(shape, torch.float64, torch.device("cpu"))]
    assert max(rows64) * 27 * plane <= max(1 << 19, 27 * plane)


@pytest.mark.parametrize("shape", [(1, 4, 9, 10, 11), (1, 3, 12, 13), (1, 2, 17)])
def test_row_window_convolutions_equal_torch(shape) -> None:
    """float32, one sample, few channels: the slabs are convolved as batches of row windows
    (forward, flipped-kernel input gradient, weight gradient); same numbers as torch's float64."""
    from iunet_nb.nn import tiled

    dim = len(shape) - 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    w = torch.randn(5, shape[1], *([3] * dim), generator=g)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dim]
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = conv(x64, w64, padding=1)
    dy = torch.randn(y64.shape, generator=g)
    y64.backward(dy.double())
    small = shape[1] * 4 * (shape[3] if dim > 1 else 1) * (shape[4] if dim > 2 else 1)
    assert tiled._batched_rows(x[:, :, :4], w)  # the slabs of this size do take the windows
    for got, want in [(conv3_tiled(x, w, tile_elements=small), y64),
                      (conv3_transpose_tiled(dy, w, tile_elements=small), x64.grad),
                      (conv3_weight_grad_tiled(x, dy, w, tile_elements=small), w64.grad)]:
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_tiled_convolution_and_gradients_equal_torch(dim: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, *([11] * dim), dtype=torch.float64)
    w = torch.randn(4, 3, *([3] * dim), dtype=torch.float64)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dim]
    y = conv(x, w, padding=1)
    dy = torch.randn_like(y)
    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    conv(x_ref, w_ref, padding=1).backward(dy)
    small = 3 * 11 ** (dim - 1) * 2  # a few rows per tile
    torch.testing.assert_close(conv3_tiled(x, w, tile_elements=small), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv3_transpose_tiled(dy, w, tile_elements=small), x_ref.grad,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv3_weight_grad_tiled(x, dy, w, tile_elements=small), w_ref.grad,
                               rtol=1e-12, atol=1e-12)


def test_3d_tiled_convolution_needs_a_fraction_of_torchs_memory() -> None:
    """At 8 x 48^3 (batch 1) torch's CPU conv3d takes the native path: ~28 input tensors of
    working memory; the tiled convolution stays within 2 (its output plus one tile)."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 48, 48, 48)
    w = torch.randn(8, 8, 3, 3, 3)
    torch_peak = _peak(lambda: F.conv3d(x, w, padding=1))
    tiled_peak = _peak(lambda: conv3_tiled(x, w))
    assert tiled_peak <= 2 * x.nbytes, (tiled_peak / x.nbytes, torch_peak / x.nbytes)
    torch.testing.assert_close(conv3_tiled(x, w), F.conv3d(x, w, padding=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("weight_larger", [False, True], ids=["flipped-kernel", "transposed"])
def test_input_gradient_on_both_paths_equals_torch(dim: int, weight_larger: bool) -> None:
    """The input gradient is a plain convolution with the flipped, transposed kernel where that
    kernel's copy is smaller than the gradient, torch's transposed convolution otherwise; tiled
    (several slabs) and whole, both equal torch's, and so does the slab-rows helper."""
    from iunet_nb.nn.tiled import _flip_pays, conv3_transpose_slab_rows

    torch.manual_seed(1)
    c = 24 if weight_larger else 3
    side = 4 if weight_larger else 12
    dy = torch.randn(1, c, *([side] * dim), dtype=torch.float64)
    w = torch.randn(c, c if weight_larger else 2, *([3] * dim), dtype=torch.float64)
    assert _flip_pays(dy, w) is not weight_larger
    want = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dim](dy, w, padding=1)
    small = c * side ** (dim - 1) * 2
    for tile in (small, None):
        torch.testing.assert_close(conv3_transpose_tiled(dy, w, tile_elements=tile), want,
                                   rtol=1e-12, atol=1e-12)
    got = torch.zeros_like(want)
    for lo, hi in [(0, 1), (1, side - 1), (side - 1, side)]:
        first, end, rows = conv3_transpose_slab_rows(dy[:, :, lo:hi], w, lo, hi, side)
        got[:, :, first:end] += rows
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_backward_kernels_use_smaller_tiles_and_give_the_same_numbers(monkeypatch) -> None:
    """The coupling backward's kernels tile by TILE_ELEMENTS / BACKWARD_TILE_DIVISOR (read at call
    time) for activations of two forward tiles or more, and compute what the forward's compute."""
    from iunet_nb.nn import tiled

    cpu = torch.device("cpu")
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", 4 * 3 * 11 * 11 * tiled.BACKWARD_TILE_DIVISOR)
    assert tiled.backward_tile_elements() == 4 * 3 * 11 * 11
    assert tiled.backward_tile_elements(slabs=True) == tiled.TILE_ELEMENTS // tiled.SLAB_BACKWARD_TILE_DIVISOR
    # the smaller tiles only for activations of two forward tiles or more
    assert tiled.conv3_kernels_for(cpu, backward_elements=2 * tiled.TILE_ELEMENTS) is tiled.TILED_CONV3_BACKWARD
    assert tiled.conv3_kernels_for(cpu, backward_elements=2 * tiled.TILE_ELEMENTS - 1) is tiled.TILED_CONV3
    assert tiled.conv3_kernels_for(cpu) is tiled.TILED_CONV3
    calls = []
    real = tiled.conv3_tiled
    monkeypatch.setattr(tiled, "conv3_tiled", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 11, 11, 11, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, 3, generator=g, dtype=torch.float64)
    dy = torch.randn(2, 4, 11, 11, 11, generator=g, dtype=torch.float64)
    fw, bw = tiled.TILED_CONV3, tiled.TILED_CONV3_BACKWARD
    torch.testing.assert_close(bw.conv(x, w), fw.conv(x, w), rtol=1e-12, atol=1e-12)
    assert calls == [tiled.backward_tile_elements(), None]
    torch.testing.assert_close(bw.conv_transpose(dy, w), fw.conv_transpose(dy, w), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bw.weight_grad(x, dy, w), fw.weight_grad(x, dy, w), rtol=1e-12, atol=1e-12)
