"""TiledConv: the values, gradients, initialisation and state dict of ``nn.ConvNd(in, out, 3,
padding=1)``, with less working memory on CPU."""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import iunet_nb.nn.tiled as tiled
from iunet_nb.common import CONV
from iunet_nb.measure.meter import measure_step
from iunet_nb.nn.conv import TiledConv

TOL = dict(rtol=1e-10, atol=1e-10)


def _pair(in_channels: int, out_channels: int, dim: int, bias: bool = True) -> tuple[TiledConv, nn.Module]:
    """A float64 TiledConv and the torch convolution with the same parameters."""
    ref = CONV[dim](in_channels, out_channels, 3, padding=1, bias=bias).double()
    conv = TiledConv(in_channels, out_channels, dim, bias=bias).double()
    conv.load_state_dict(ref.state_dict())
    return conv, ref


def _assert_same_step(conv: TiledConv, ref: nn.Module, x: torch.Tensor) -> None:
    """Output and the gradients of input, weight and bias equal within 1e-10."""
    x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x_ref), conv(x_new)
    torch.testing.assert_close(y, y_ref, **TOL)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y.backward(dy)
    torch.testing.assert_close(x_new.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad, **TOL)
    if ref.bias is not None:
        torch.testing.assert_close(conv.bias.grad, ref.bias.grad, **TOL)
    else:
        assert conv.bias is None


@pytest.mark.parametrize("dim, shape", [
    (1, (2, 3, 17)), (1, (1, 1, 1)),
    (2, (2, 3, 9, 7)), (2, (1, 2, 1, 5)),
    (3, (2, 3, 6, 5, 4)), (3, (1, 4, 2, 3, 1)),
])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_torch(dim: int, shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    conv, ref = _pair(shape[1], 5, dim, bias)
    _assert_same_step(conv, ref, torch.randn(shape, dtype=torch.float64))


@pytest.mark.parametrize("dim, shape", [(1, (2, 3, 40)), (2, (2, 3, 20, 9)), (3, (1, 3, 12, 7, 6))])
def test_values_and_gradients_equal_torch_over_several_slabs(dim: int, shape: tuple[int, ...],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A small TILE_ELEMENTS splits the rows into several slabs (checked) in both directions."""
    rest = 1
    for size in shape[3:]:
        rest *= size
    # float64 takes ATen's native path, whose slabs are sized for 3^dim unfolded copies:
    # about 3 rows of 4 channels per slab
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", 3 * 4 * rest * 3**dim)
    for channels in (shape[1], 4):  # the forward's input, then the backward's (the output gradient)
        n_slabs = len(tiled.conv_tile_bounds((shape[0], channels, *shape[2:]), torch.float64,
                                             torch.device("cpu")))
        assert n_slabs >= 3, n_slabs
    torch.manual_seed(1)
    conv, ref = _pair(shape[1], 4, dim)
    _assert_same_step(conv, ref, torch.randn(shape, dtype=torch.float64))


def test_default_tiles_at_a_larger_size() -> None:
    """1 x 16 x 40^3 float64: more than one slab with the package's own tile size."""
    shape = (1, 16, 40, 40, 40)
    assert len(tiled.conv_tile_bounds(shape, torch.float64, torch.device("cpu"))) > 1
    torch.manual_seed(2)
    conv, ref = _pair(16, 1, 3)
    _assert_same_step(conv, ref, torch.randn(shape, dtype=torch.float64))


@st.composite
def cases(draw: st.DrawFn) -> dict:
    dim = draw(st.sampled_from([1, 2, 3]))
    return dict(dim=dim, batch=draw(st.integers(1, 2)), cin=draw(st.integers(1, 4)),
                cout=draw(st.integers(1, 4)), bias=draw(st.booleans()),
                sizes=draw(st.lists(st.integers(1, 7), min_size=dim, max_size=dim)),
                tile_elements=draw(st.sampled_from([1, 50, 400, 1 << 19])), seed=draw(st.integers(0, 2**16)))


@given(case=cases())
def test_property_equals_torch(case: dict) -> None:
    """Random dims, channels, sizes and tile sizes (1 element: one row per slab)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiled, "TILE_ELEMENTS", case["tile_elements"])
        torch.manual_seed(case["seed"])
        conv, ref = _pair(case["cin"], case["cout"], case["dim"], case["bias"])
        x = torch.randn(case["batch"], case["cin"], *case["sizes"], dtype=torch.float64)
        _assert_same_step(conv, ref, x)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_initialisation_and_state_dict_match_torch(dim: int, bias: bool) -> None:
    torch.manual_seed(7)
    ref = CONV[dim](6, 3, 3, padding=1, bias=bias)
    torch.manual_seed(7)
    conv = TiledConv(6, 3, dim, bias=bias)
    assert conv.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert conv.state_dict()[key].shape == value.shape
        assert torch.equal(conv.state_dict()[key], value), key  # same draws, same order
    # either way round
    other = CONV[dim](6, 3, 3, padding=1, bias=bias)
    other.load_state_dict(TiledConv(6, 3, dim, bias=bias).state_dict())
    conv.load_state_dict(other.state_dict())
    assert all(torch.equal(conv.state_dict()[k], v) for k, v in other.state_dict().items())


def test_in_place_bias_keeps_autograd_sound() -> None:
    """The bias is added in place to conv3's output: gradcheck through a tiled float64 step."""
    torch.manual_seed(3)
    conv = TiledConv(2, 3, 2).double()
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiled, "TILE_ELEMENTS", 1)
        assert torch.autograd.gradcheck(lambda x, w, b: torch.func.functional_call(
            conv, {"weight": w, "bias": b}, (x,)), (x, conv.weight, conv.bias))


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_channels=1, out_channels=1, dim=0), "dim must be 1, 2 or 3"),
    (dict(in_channels=1, out_channels=1, dim=4), "dim must be 1, 2 or 3"),
    (dict(in_channels=1, out_channels=1, dim=True), "dim must be"),
    (dict(in_channels=0, out_channels=1, dim=2), "in_channels must be a positive integer"),
    (dict(in_channels=2.0, out_channels=1, dim=2), "in_channels must be a positive integer"),
    (dict(in_channels=1, out_channels=-3, dim=2), "out_channels must be a positive integer"),
    (dict(in_channels=1, out_channels=True, dim=2), "out_channels must be a positive integer"),
])
def test_arguments_are_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TiledConv(**kwargs)


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (1, 4, 8, 8, 8), (3, 8, 8, 8), (1, 3, 8, 8, 8, 1)])
def test_input_shape_is_checked(shape: tuple[int, ...]) -> None:
    conv = TiledConv(3, 2, 3)
    expected = re.escape(f"TiledConv(in_channels=3, dim=3) expects input of shape (N, 3, D, H, W), got {shape}")
    with pytest.raises(ValueError, match=expected):
        conv(torch.zeros(shape))


def test_repr() -> None:
    assert repr(TiledConv(16, 1, 3)) == "TiledConv(16, 1, dim=3)"
    assert repr(TiledConv(2, 4, 1, bias=False)) == "TiledConv(2, 4, dim=1, bias=False)"


def test_16_to_1_step_needs_at_least_one_input_less_than_torchs() -> None:
    """1 x 16 x 48^3 float32 (oneDNN): torch's backward holds the input gradient and two
    input-sized buffers (peak ~3.1 inputs); the tiled one the input gradient and tile-sized
    buffers (~1.75 inputs).  Measured here: a difference of ~1.38 inputs."""
    torch.manual_seed(4)
    x = torch.randn(1, 16, 48, 48, 48, requires_grad=True)
    peaks = {}
    for name, module in (("torch", nn.Conv3d(16, 1, 3, padding=1)), ("tiled", TiledConv(16, 1, 3))):
        x.grad = None
        peaks[name] = measure_step(module, x).peak_bytes
        assert x.grad is not None and x.grad.shape == x.shape
    saved = (peaks["torch"] - peaks["tiled"]) / x.nbytes
    assert saved >= 1.0, {k: v / x.nbytes for k, v in peaks.items()}


def test_volume_bench_uses_tiled_outer_convolutions_for_every_body() -> None:
    """The volume benchmark's outer convolutions are the same kind for every mode (a fair comparison)."""
    from iunet_nb.measure.bench import iunets_available
    from iunet_nb.measure.bench3d import CHANNELS, MODES, build_volume_model

    for mode in MODES:
        if mode == "iunets" and not iunets_available():
            continue
        model = build_volume_model(mode)
        assert isinstance(model.conv_in, TiledConv) and isinstance(model.conv_out, TiledConv), mode
        assert (model.conv_in.in_channels, model.conv_in.out_channels) == (1, CHANNELS[0])
        assert (model.conv_out.in_channels, model.conv_out.out_channels) == (CHANNELS[0], 1)
