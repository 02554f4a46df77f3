"""The installed reference ``iunets`` 0.1 as an oracle for the drop-in modules.

Checks (hypothesis draws configurations the reference supports):
* fixed inits ('haar', 'squeeze'/'pixel_shuffle'): ``iunet_nb.layers`` resamplings give the
  reference's output channel for channel (float32 <= 1e-6, float64 <= 1e-12);
* reference state dicts load strictly into the same layers and into ``iunet_nb.iUNet`` /
  ``iunet_nb.networks.iUNet``, which then compute the reference's output (<= 1e-5 relative);
* the first API's channels follow ``c_{i+1} = (c_i // slice_fraction) * 2**dim``;
* the reference's defects that are kept correct here.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

iunets = pytest.importorskip("iunets", reason="the reference package iunets 0.1 is not installed")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import iunets.layers as R  # noqa: E402
    from iunets.baseline_networks import StandardUNet as RefStandardUNet  # noqa: E402

import iunet_nb  # noqa: E402
import iunet_nb.layers as L  # noqa: E402
from iunet_nb import networks  # noqa: E402
from iunet_nb.baseline_networks import StandardUNet  # noqa: E402
from iunet_nb.compat.reference import reference_haar  # noqa: E402
from iunet_nb.nn.resampling import haar_matrix  # noqa: E402

torch.set_num_threads(1)
SETTINGS = settings(max_examples=12, deadline=None)


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@SETTINGS
@given(dim=st.sampled_from([1, 2, 3]), method=st.sampled_from(["cayley", "exp"]),
       init=st.sampled_from(["haar", "squeeze", "pixel_shuffle"]), learnable=st.booleans(),
       channels=st.integers(1, 3), double=st.booleans(), seed=st.integers(0, 2**16))
def test_fixed_inits_match_the_reference_channel_for_channel(dim, method, init, learnable, channels,
                                                              double, seed):
    dtype = torch.float64 if double else torch.float32
    kw = {"init_kwargs": {"dtype": "float64"}} if double else {}
    ref_init = "squeeze" if init == "pixel_shuffle" else init  # the reference's name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(R, f"InvertibleDownsampling{dim}D")(channels, 2, method, ref_init, learnable, **kw)
    ref = ref.to(dtype)
    ours = getattr(L, f"InvertibleDownsampling{dim}D")(channels, 2, method, init, learnable, **kw)
    x = torch.randn(2, channels, *([4] * dim), dtype=dtype, generator=torch.Generator().manual_seed(seed))
    tol = 1e-12 if double else 1e-6
    with torch.no_grad():
        y = ref(x)
        assert (ours(x) - y).abs().max().item() <= tol
        assert (ours.inverse(y) - x).abs().max().item() <= 10 * tol
    if dim > 1:  # the reference's 1D upsampling cannot be built (see the defects below)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_up = getattr(R, f"InvertibleUpsampling{dim}D")(channels * 2**dim, 2, method, ref_init,
                                                                learnable, **kw).to(dtype)
        up = getattr(L, f"InvertibleUpsampling{dim}D")(channels * 2**dim, 2, method, init, learnable, **kw)
        with torch.no_grad():
            assert (up(y) - ref_up(y)).abs().max().item() <= tol


def test_haar_order_is_a_signed_permutation_of_the_package_haar():
    for dim in (1, 2, 3):
        for method in ("cayley", "exp"):
            P = reference_haar(dim, method) @ haar_matrix((2,) * dim).T
            Pr = P.round()
            assert (P - Pr).abs().max() < 1e-14
            ones = torch.ones(2**dim, dtype=torch.float64)
            assert torch.equal(Pr.abs().sum(0), ones) and torch.equal(Pr.abs().sum(1), ones)


@SETTINGS
@given(dim=st.sampled_from([1, 2, 3]), method=st.sampled_from(["cayley", "exp"]),
       init=st.sampled_from(["haar", "squeeze"]), learnable=st.booleans(), channels=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_resampling_and_mixing_checkpoints_load_strictly(dim, method, init, learnable, channels, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(R, f"InvertibleDownsampling{dim}D")(channels, 2, method, init, learnable)
        mix = getattr(R, f"InvertibleChannelMixing{dim}D")(channels + 1, method, learnable)
    with torch.no_grad():
        ref.weight.normal_(generator=torch.Generator().manual_seed(seed))
        mix.weight.normal_(generator=torch.Generator().manual_seed(seed + 1))
    ours = getattr(L, f"InvertibleDownsampling{dim}D")(channels, 2, method, "pixel_shuffle", learnable)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours_mix = getattr(L, f"InvertibleChannelMixing{dim}D")(channels + 1, method, learnable)
    ours_mix.load_state_dict(mix.state_dict(), strict=True)
    x = torch.randn(2, channels, *([4] * dim))
    xm = torch.randn(2, channels + 1, *([3] * dim))
    with torch.no_grad():
        assert _rel(ours(x), ref(x)) <= 1e-5
        assert _rel(ours_mix(xm), mix(xm)) <= 1e-5
    again = getattr(L, f"InvertibleDownsampling{dim}D")(channels, 2, method, init, learnable)
    again.load_state_dict(ours.state_dict(), strict=True)  # this package's own format
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))


@SETTINGS
@given(dim=st.sampled_from([1, 2, 3]), c_in=st.integers(1, 4), c_out=st.integers(1, 4),
       depth=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_standard_coupling_checkpoints_load_strictly(dim, c_in, c_out, depth, seed):
    ref = R.StandardAdditiveCoupling(R.StandardBlock(dim, c_in, c_out, depth, False), c_out)
    _randomize(ref, seed)
    ours = L.StandardAdditiveCoupling(L.StandardBlock(dim, c_in, c_out, depth), c_out)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, c_in + c_out, *([4] * dim))
    with torch.no_grad():
        assert _rel(ours(x), ref(x)) <= 1e-5
        assert _rel(ours.inverse(ref(x)), x) <= 1e-5
    block = L.StandardBlock(dim, c_in, c_out, depth)
    block.load_state_dict(ref.F.state_dict(), strict=True)


_IUNET_CONFIGS = st.fixed_dictionaries({
    "dim": st.sampled_from([2, 3]),
    "in_channels": st.integers(2, 5),
    "architecture": st.lists(st.integers(1, 2), min_size=2, max_size=3).map(tuple),
    "resampling_method": st.sampled_from(["cayley", "exp"]),
    "resampling_init": st.sampled_from(["haar", "squeeze"]),
    "learnable_resampling": st.booleans(),
    "channel_mixing_freq": st.sampled_from([-1, 0, 1, 2]),
    "learnable_channel_mixing": st.booleans(),
    "block_depth": st.integers(1, 2),
})


@settings(max_examples=8, deadline=None)
@given(cfg=_IUNET_CONFIGS, seed=st.integers(0, 2**16), modern=st.booleans())
def test_iunet_checkpoints_load_strictly_and_reproduce_the_output(cfg, seed, modern):
    cfg = dict(cfg)
    cfg["module_kwargs"] = {"block_depth": cfg.pop("block_depth")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = iunets.iUNet(**cfg, verbose=0)
    _randomize(ref, seed)
    cls = iunet_nb.iUNet if modern else networks.iUNet
    ours = cls(**cfg, verbose=0)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, cfg["in_channels"], *([8] * cfg["dim"]), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y_ref = ref(x.clone())
        y = ours(x)
    assert _rel(y, y_ref) <= 1e-5
    again = cls(**cfg, verbose=0)
    if not modern:  # the reference structure from the start: its own checkpoints load back
        again.load_state_dict(ours.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.equal(again(x), y)


@settings(max_examples=20, deadline=None)
@given(dim=st.sampled_from([1, 2, 3]), c=st.integers(1, 40), sf=st.integers(2, 8),
       levels=st.integers(1, 4))
def test_first_api_channels_follow_the_arithmetic(dim, c, sf, levels):
    arch = [1] * levels
    expected, ok = [c], True
    for _ in range(levels - 1):
        if expected[-1] // sf < 1:
            ok = False
            break
        expected.append((expected[-1] // sf) * 2**dim)
    if not ok:
        with pytest.raises(ValueError, match="slice_fraction"):
            networks.first_api_channels(c, arch, dim, sf)
        return
    assert networks.first_api_channels(c, arch, dim, sf) == tuple(expected)


def test_first_api_builds_the_script_model_and_warns_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = networks.iUNet(24, dim=3, architecture=[1, 1, 1], create_module_fn=L.create_standard_module,
                               slice_fraction=4, learnable_downsampling=True, disable_custom_gradient=False)
    future = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert len(future) == 1 and "channels=(24, 48, 96)" in str(future[0].message)
    assert model.channels == (24, 48, 96) and model.skipped_channels == [18, 36]
    x = torch.randn(1, 24, 4, 4, 4)
    assert (model.inverse(model(x)) - x).abs().max() < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shaped = networks.iUNet((3, 16, 16), networks.create_standard_module, architecture=[2, 2])
        assert shaped.dim == 2 and shaped.channels == (3, 4)
        with pytest.raises(TypeError, match="slice_mod"):
            networks.iUNet(24, dim=3, architecture=[1, 1], slice_fraction=4, slice_mod="double")


def test_standard_unet_has_the_reference_shapes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = RefStandardUNet(3, dim=2, architecture=[2, 2, 2], base_filters=8, zero_init=True)
    ours = StandardUNet(3, dim=2, architecture=[2, 2, 2], base_filters=8, zero_init=True)
    x = torch.randn(1, 3, 16, 16)
    assert ours(x).shape == ref(x).shape
    n_ref = sum(p.numel() for p in ref.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    assert 0.5 <= n_ours / n_ref <= 2.0
    skip = StandardUNet((3, 16, 16), architecture=[2, 2], base_filters=4, skip_connection=True, zero_init=True)
    assert torch.equal(skip(x), x)


# ------------------------------------------------------------------ the reference's defects, kept correct here
def test_reference_1d_upsampling_cannot_be_built_ours_inverts_the_downsampling():
    with pytest.raises(RuntimeError):
        R.InvertibleUpsampling1D(4, 2)(torch.randn(1, 4, 8))  # stride read as (2, 2): 0 groups
    down, up = L.InvertibleDownsampling1D(2, 2), L.InvertibleUpsampling1D(4, 2)
    x = torch.randn(1, 2, 8)
    torch.testing.assert_close(up(down(x)), x)


def test_reference_standard_unet_crashes_with_its_defaults_ours_builds():
    with pytest.raises(IndexError):
        RefStandardUNet(3, dim=2, architecture=[2, 2], base_filters=4)
    assert StandardUNet(3, dim=2, architecture=[2, 2], base_filters=4)(torch.randn(1, 3, 8, 8)).shape == (1, 8, 8, 8)


def test_haar_for_other_strides_is_the_orthogonal_generalisation_not_pixel_shuffle():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = R.InvertibleDownsampling2D(1, (1, 2), "cayley", "haar", False)  # prints a fallback note
        squeeze = R.InvertibleDownsampling2D(1, (1, 2), "cayley", "squeeze", False)
    ours = L.InvertibleDownsampling2D(1, (1, 2), "cayley", "haar", False)
    x = torch.randn(1, 1, 4, 4)
    assert torch.equal(ref(x), squeeze(x))  # the reference falls back to pixel shuffle
    torch.testing.assert_close(ours.kernel()[0].double(), haar_matrix((1, 2)), atol=1e-7, rtol=0)
    assert (ours(x) - ref(x)).abs().max() > 0.1
