"""Device-generic code paths, checked on the CPU (docs/engine-devices.md).

* :class:`~iunet_nb.engine.steps.RecomputeContext` replays the forward's RNG state and leaves
  the caller's generator as it was; a ``meta`` input records only the CPU state; a device
  type without RNG helpers is a clear error.
* The tiling decisions of :mod:`iunet_nb.nn.tiled` for a CUDA device (a ``torch.device``
  needs no GPU): whole-tensor kernels, no oneDNN heuristics, but the slab-wise
  recomputation is still cut into slabs.
* ``bench volume3d --device cuda`` without CUDA fails before any work, naming the fix.
"""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from iunet_nb.engine import steps
from iunet_nb.engine.steps import RecomputeContext
from iunet_nb.nn import tiled


def test_recompute_context_replays_the_forward_draws_and_restores_the_caller_state() -> None:
    torch.manual_seed(3)
    x = torch.zeros(4)
    module = nn.Dropout(0.5)
    record = RecomputeContext.capture(module, x, preserve_rng_state=True)
    assert set(record) == {"cpu_rng"}  # CPU input: no accelerator state
    forward_draw = torch.rand(8)
    after_forward = torch.get_rng_state()
    with RecomputeContext(module, record, preserve_rng_state=True):
        replay = torch.rand(8)
    assert torch.equal(replay, forward_draw)
    assert torch.equal(torch.get_rng_state(), after_forward), "the caller's generator was moved"


def test_recompute_context_without_preserve_records_nothing() -> None:
    record = RecomputeContext.capture(nn.Identity(), torch.zeros(1), preserve_rng_state=False)
    assert record == {}
    state = torch.get_rng_state()
    with RecomputeContext(nn.Identity(), record, preserve_rng_state=False):
        torch.rand(3)
    assert not torch.equal(torch.get_rng_state(), state)  # no fork: draws advance the generator


def test_meta_input_records_only_the_cpu_state() -> None:
    record = RecomputeContext.capture(nn.Identity(), torch.empty(2, device="meta"), True)
    assert set(record) == {"cpu_rng"}


def test_device_without_rng_helpers_is_a_clear_error(monkeypatch) -> None:
    fake = types.SimpleNamespace()  # a device module without get_rng_state/set_rng_state
    monkeypatch.setattr(steps.torch, "get_device_module", lambda device_type: fake)
    x = types.SimpleNamespace(device=torch.device("cuda", 0))  # _rng_device reads only .device
    with pytest.raises(RuntimeError, match="preserve_rng_state=False"):
        steps._rng_device(x)


@pytest.mark.parametrize("dim", [2, 3])
def test_tiling_decisions_for_a_cuda_device(dim: int) -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert tiled.conv3_kernels_for(cuda) is tiled.WHOLE_CONV3
    assert tiled.conv3_kernels_for(cuda, backward_elements=1 << 30) is tiled.WHOLE_CONV3
    assert tiled.conv3_kernels_for(cpu).tiled
    # a small one-sample slab: on CPU it is sized for oneDNN's row windows, on CUDA plainly
    shape = (1, 4) + (64,) * dim
    plane = 4 * 64 ** (dim - 1)
    elements = 16 * plane
    assert tiled.conv_tile_bounds(shape, torch.float32, cuda, elements) == tiled.tile_bounds(64, plane, elements)
    assert not tiled._unfolds_input(shape, torch.float32, cuda, 16)
    assert not tiled._rows_as_batch_possible(shape, torch.float32, cuda)
    # the slab-wise recomputation still cuts a large activation into slabs on the GPU
    assert len(tiled.conv_tile_bounds((1, 32, 512, 512), torch.float32, cuda,
                                      tiled.backward_tile_elements(slabs=True))) > 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown where CUDA is missing")
def test_volume3d_cuda_without_cuda_is_a_clear_cli_error(tmp_path, capsys) -> None:
    from iunet_nb.measure import bench

    out = tmp_path / "res"
    with pytest.raises(SystemExit) as exc:
        bench.main(["volume3d", "--device", "cuda", "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "CUDA is not available" in err and "--device cpu" in err
    assert not out.exists()
