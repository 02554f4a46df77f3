"""Tests of the step-memory predictor iunet_nb.measure.predict against the meter."""

from __future__ import annotations

import time

import pytest
import torch

from iunet_nb import iUNet
from iunet_nb.arch.baselines import UNet
from iunet_nb.arch.layout import compute_layout, count_parameters
from iunet_nb.measure.meter import measure_step
from iunet_nb.measure.predict import MODES, MemoryPrediction, max_batch_size, predict_step_memory

torch.set_num_threads(1)

CH = (64, 128, 256, 512, 1024)
TOL = 0.15  # the predictor's target accuracy against measure_step


def table1_layout(delta: int):
    return compute_layout(CH, [delta] * 5, 2)


def build(mode: str, delta: int):
    torch.manual_seed(0)
    if mode.startswith("unet"):
        return UNet(channels=CH, architecture=[delta] * 5, dim=2, checkpoint_levels=mode == "unet_checkpoint")
    return iUNet(channels=CH, architecture=[delta] * 5, dim=2, verbose=0,
                 disable_custom_gradient=mode == "conventional",
                 me_backend="memcnn" if mode == "memcnn" else "fused")


def test_decomposition_and_str():
    p = predict_step_memory(table1_layout(5), (1, 64, 512, 512), "float32", "fused")
    assert isinstance(p, MemoryPrediction)
    assert p.peak_step == p.gradients + p.activations
    assert p.total == p.parameters + p.input + p.peak_step == p.bytes
    assert p.input == 64 * 512 * 512 * 4 == p.tensor
    assert p.gradients == p.parameters == 4 * 32_158_080
    text = str(p)
    assert "fused" in text and "MiB" in text and "input tensors" in text
    assert "GiB" in str(predict_step_memory(table1_layout(30), (1, 64, 512, 512), mode="conventional"))


@pytest.mark.parametrize("delta", [5, 30])
def test_parameters_match_layout_count_and_model(delta):
    layout = table1_layout(delta)
    want = 4 * count_parameters(layout)["total"]
    for mode in ("conventional", "fused", "memcnn"):
        assert predict_step_memory(layout, (1, 64, 64, 64), mode=mode).parameters == want
    if delta == 5:
        model = build("fused", delta)
        assert predict_step_memory(model, (1, 64, 64, 64)).parameters == sum(p.nbytes for p in model.parameters())
        unet = build("unet", delta)
        assert predict_step_memory(layout, (1, 64, 64, 64), mode="unet").parameters == \
            sum(p.nbytes for p in unet.parameters())


def test_layout_prediction_allocates_nothing_and_is_fast():
    # 8 x 64 x 4096 x 4096 float32 would need > 40 GiB for the input alone.
    layout = table1_layout(30)
    start = time.perf_counter()
    preds = {m: predict_step_memory(layout, (8, 64, 4096, 4096), "float32", m) for m in MODES}
    assert time.perf_counter() - start < 2.0
    assert preds["conventional"].total > 100 * 2**30
    assert preds["fused"].total < preds["conventional"].total / 5
    assert preds["unet_checkpoint"].total < preds["unet"].total


def test_model_and_layout_agree_and_padding():
    layout = table1_layout(2)
    a = predict_step_memory(layout, (1, 64, 64, 64), mode="fused")
    b = predict_step_memory(layout, (1, 64, 60, 61), mode="fused")  # padded to 64 x 64
    assert b.input == 64 * 60 * 61 * 4
    assert b.activations == a.activations
    assert b.details["padded_spatial"] == [64, 64]
    torch.manual_seed(0)
    model = iUNet(channels=CH, architecture=[2] * 5, dim=2, verbose=0)
    assert predict_step_memory(model, (1, 64, 64, 64)).total == a.total


def test_dtype_scales_bytes_and_mode_validation():
    layout = table1_layout(5)
    p32 = predict_step_memory(layout, (1, 64, 256, 256), "float32", "conventional")
    p64 = predict_step_memory(layout, (1, 64, 256, 256), torch.float64, "conventional")
    assert p64.parameters == 2 * p32.parameters
    assert abs(p64.activations - 2 * p32.activations) <= 0.01 * p64.activations
    with pytest.raises(ValueError, match="mode must be one of"):
        predict_step_memory(layout, (1, 64, 64, 64), mode="nope")
    with pytest.raises(ValueError, match="channels"):
        predict_step_memory(layout, (1, 3, 64, 64))


def test_memory_efficient_modes_grow_only_by_weights():
    """ME: the step peak grows with delta by the gradients only; conventional by activations too."""
    a, b = table1_layout(5), table1_layout(30)
    shape = (1, 64, 512, 512)
    for mode in ("fused", "memcnn"):
        pa, pb = predict_step_memory(a, shape, mode=mode), predict_step_memory(b, shape, mode=mode)
        assert abs(pb.activations - pa.activations) <= 0.05 * pa.activations
    ca, cb = predict_step_memory(a, shape, mode="conventional"), predict_step_memory(b, shape, mode="conventional")
    assert cb.activations > 4 * ca.activations
    # the paper's ME figure at 512^2, delta=30, is 2.06 GB: ours should be below it
    assert predict_step_memory(b, shape, mode="fused").total < 2.06 * 2**30


def test_max_batch_size():
    layout = table1_layout(5)
    shape = (1, 64, 128, 128)
    budget = 2 * 2**30
    for mode in ("fused", "conventional"):
        n = max_batch_size(layout, shape, "float32", mode, budget)
        assert n >= 1
        assert predict_step_memory(layout, (n, 64, 128, 128), mode=mode).total <= budget
        assert predict_step_memory(layout, (n + 1, 64, 128, 128), mode=mode).total > budget
    assert max_batch_size(layout, shape, "float32", "fused", 10 * 2**20) == 0
    assert max_batch_size(layout, shape, "float32", "fused", budget) > \
        max_batch_size(layout, shape, "float32", "conventional", budget)


def _check_against_meter(mode: str, size: int, delta: int) -> None:
    model = build(mode, delta)
    x = torch.randn(1, 64, size, size, generator=torch.Generator().manual_seed(1))
    m = measure_step(model, x)
    p = predict_step_memory(table1_layout(delta), tuple(x.shape), "float32", mode)
    assert p.parameters == m.param_bytes
    err_step = p.peak_step / m.peak_bytes - 1
    err_total = p.total / m.total_bytes - 1
    assert abs(err_step) <= TOL and abs(err_total) <= TOL, (
        f"{mode} {size}^2 delta={delta}: predicted step {p.peak_step / 2**20:.1f} MiB vs measured "
        f"{m.peak_bytes / 2**20:.1f} MiB ({100 * err_step:+.1f} %), activations predicted "
        f"{p.activations / 2**20:.1f} vs measured {m.activation_bytes / 2**20:.1f} MiB")


@pytest.mark.parametrize("mode", MODES)
def test_predictor_within_15_percent_at_64(mode):
    _check_against_meter(mode, 64, 5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["conventional", "fused", "memcnn"])
def test_predictor_within_15_percent_at_128(mode):
    _check_against_meter(mode, 128, 5)


@pytest.mark.parametrize("shape, match", [
    ((1, 64, -64, 64), "spatial sizes must be >= 1"),
    ((1, 64, 0, 64), "spatial sizes must be >= 1"),
    ((-1, 64, 64, 64), "batch size N must be >= 0"),
    ((1, 64, 64.5, 64), "must hold integers"),
    ((1, 64, 64), "2 spatial dimensions"),
    (64, "must be a sequence"),
])
def test_bad_input_shape_is_a_clear_error(shape, match):
    with pytest.raises(ValueError, match=match) as err:
        predict_step_memory(table1_layout(5), shape)
    assert "input_shape" in str(err.value)


def test_bad_arguments_are_clear_errors():
    layout = table1_layout(5)
    shape = (1, 64, 64, 64)
    with pytest.raises(ValueError, match="dtype='int64'"):
        predict_step_memory(layout, shape, "int64")
    with pytest.raises(ValueError, match="dtype=torch.uint8"):
        predict_step_memory(layout, shape, torch.uint8)
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        predict_step_memory(layout, shape, depth=0)
    with pytest.raises(ValueError, match="channel_mixing_freq"):
        predict_step_memory(layout, shape, channel_mixing_freq=-2)
    for budget in (-1, float("nan"), "1GiB"):
        with pytest.raises(ValueError, match="budget_bytes must be"):
            max_batch_size(layout, shape, "float32", "fused", budget)
    with pytest.raises(ValueError, match="spatial sizes must be >= 1"):
        max_batch_size(layout, (1, 64, -8, 64), "float32", "fused", 2**30)
    with pytest.raises(ValueError, match="dtype="):
        max_batch_size(layout, shape, "int8", "fused", 2**30)
    # an empty batch is valid: nothing but the weights
    empty = predict_step_memory(layout, (0, 64, 64, 64))
    assert empty.activations == 0 and empty.total == 2 * empty.parameters
    # every prediction is non-negative
    for mode in MODES:
        p = predict_step_memory(layout, (1, 64, 1, 1), mode=mode)
        assert min(p.parameters, p.gradients, p.activations, p.input, p.total) >= 0
