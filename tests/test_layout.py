"""Tests for iunet_nb/arch/layout.py (pure layout arithmetic, no torch)."""

import importlib.util
import math
import pathlib
import random
import re
import subprocess
import sys
import textwrap

import pytest

LAYOUT_PATH = pathlib.Path(__file__).resolve().parents[1] / "iunet_nb" / "arch" / "layout.py"


def _load_standalone():
    spec = importlib.util.spec_from_file_location("_iunet_nb_layout_standalone",
                                                  LAYOUT_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


L = _load_standalone()


# --------------------------------------------------------------------------
# The four layouts printed in the reference package's READMEs (verbatim):
# iunets master (channels= API) and iunets 0.1 on PyPI (in_channels= API)
# --------------------------------------------------------------------------

MASTER_README_2D = """\
64-64-(32/32)--------------------------------------------------------(32/32)-64-64
---------128-128-(64/64)---------------------------------(64/64)-128-128----------
---------------------256-256-(160/96)--------(160/96)-256-256---------------------
---------------------------------384-384--384-384---------------------------------"""

MASTER_README_3D = """\
7-7-(5/2)-------------------------------------------------(5/2)-7-7
------16-16-16-(12/4)------------------------(12/4)-16-16-16-------
------------------32-(9/23)------------(9/23)-32-------------------
------------------------92-92-92--92-92-92-------------------------"""

PYPI_README_2D = """\
64-64-(32/32)---------------------------------------------------------(32/32)-64-64
---------128-128-(64/64)----------------------------------(64/64)-128-128----------
---------------------256-256-(128/128)-------(128/128)-256-256---------------------
---------------------------------512-512--512-512----------------------------------"""

PYPI_README_3D = """\
7-7-(5/2)-------------------------------------------------(5/2)-7-7
------16-16-16-(12/4)------------------------(12/4)-16-16-16-------
------------------32-(24/8)------------(24/8)-32-------------------
------------------------64-64-64--64-64-64-------------------------"""

MASTER_README_MESSAGE_HEAD = """\
Could not exactly create an iUNet with channels=(7, 15, 35, 91) and
resampling_stride=[(2, 2, 2), (2, 2, 2), (1, 2, 2)]. Instead using closest
achievable configuration: channels=(7, 16, 32, 92)."""


@pytest.mark.parametrize(
    "channels, architecture, dim, stride, expected_channels, expected",
    [
        ((64, 128, 256, 384), (2, 2, 2, 2), 2, 2, (64, 128, 256, 384),
         MASTER_README_2D),
        ((7, 15, 35, 91), (2, 3, 1, 3), 3, [2, 2, (1, 2, 2)],
         (7, 16, 32, 92), MASTER_README_3D),
    ],
    ids=["master-2d", "master-3d"],
)
def test_master_readme_layouts(channels, architecture, dim, stride,
                          expected_channels, expected):
    layout = L.compute_layout(channels, architecture, dim, stride)
    assert layout.channels == expected_channels
    assert L.format_layout(layout) == expected
    assert layout.text() == expected
    assert str(layout) == expected


@pytest.mark.parametrize(
    "in_channels, architecture, dim, expected_channels, expected",
    [
        (64, [2, 2, 2, 2], 2, (64, 128, 256, 512), PYPI_README_2D),
        (7, [2, 3, 1, 3], 3, (7, 16, 32, 64), PYPI_README_3D),
    ],
    ids=["pypi-2d", "pypi-3d"],
)
def test_pypi_readme_layouts(in_channels, architecture, dim, expected_channels,
                          expected):
    channels = L.channels_from_slice_mode(in_channels, architecture, dim, 2,
                                          "double")
    assert channels == expected_channels
    layout = L.compute_layout(channels, architecture, dim, 2)
    assert not layout.adjusted
    assert layout.text() == expected


# --------------------------------------------------------------------------
# Adjustment message
# --------------------------------------------------------------------------

def test_adjustment_message_reference_wording():
    layout = L.compute_layout((7, 15, 35, 91), (2, 3, 1, 3), 3,
                              [2, 2, (1, 2, 2)])
    assert layout.adjusted
    msg = layout.adjustment_message()
    lines = msg.split("\n")
    assert "\n".join(lines[:3]) == MASTER_README_MESSAGE_HEAD
    assert lines[3] == "Average relative error: 0.0545"
    assert lines[4] == ("Relative error per level: level 1: 0.0667, "
                        "level 2: 0.0857, level 3: 0.0110")
    assert len(lines) == 5


def test_relative_errors_and_mean():
    layout = L.compute_layout((7, 15, 35, 91), (2, 3, 1, 3), 3,
                              [2, 2, (1, 2, 2)])
    assert layout.requested == (7, 15, 35, 91)
    assert layout.relative_errors == pytest.approx((1 / 15, 3 / 35, 1 / 91))
    assert layout.mean_relative_error == pytest.approx(
        (1 / 15 + 3 / 35 + 1 / 91) / 3)
    assert round(layout.mean_relative_error, 4) == 0.0545


def test_mean_over_all_levels_as_in_the_reference_docs():
    # level 1 exact (16), level 2 changed 35 -> 32: the mean runs over levels 1..L-1,
    # as the reference documentation's "Average relative error: 0.1527" (tested in
    # tests/test_original_docs.py) shows.
    layout = L.compute_layout((7, 16, 35), (1, 1, 1), 3, 2)
    assert layout.channels == (7, 16, 32)
    assert layout.relative_errors == pytest.approx((0.0, 3 / 35))
    assert layout.mean_relative_error == pytest.approx(3 / 70)


@pytest.mark.parametrize("width", range(74, 85))
def test_reference_message_wraps_same_for_nearby_widths(width):
    layout = L.compute_layout((7, 15, 35, 91), (2, 3, 1, 3), 3,
                              [2, 2, (1, 2, 2)])
    assert layout.adjustment_message(width=width).startswith(
        MASTER_README_MESSAGE_HEAD + "\n")


def test_message_does_not_break_inside_values():
    layout = L.compute_layout((16, 27, 51, 99, 205, 411), (1,) * 6, 2, 2)
    msg = layout.adjustment_message()
    body = msg.split("\nAverage")[0]
    assert f"channels={layout.requested!r}" in body
    assert f"channels={layout.channels!r}" in body
    lines = body.split("\n")
    assert len(lines) == 3
    assert all(len(line) <= L.MESSAGE_WIDTH for line in lines)


@pytest.mark.parametrize(
    "channels, architecture, dim, stride",
    [
        ((64, 128, 256, 384), (2, 2, 2, 2), 2, 2),
        ((64, 128, 256, 512), (2, 2, 2, 2), 2, 2),
        ((7, 16, 32, 64), (2, 3, 1, 3), 3, 2),
        ((7, 16, 32, 92), (2, 3, 1, 3), 3, [2, 2, (1, 2, 2)]),
        ((5,), (3,), 1, 2),
        ((3, 4, 6), (1, 2, 3), 1, 2),
    ],
)
def test_exact_layout_has_no_message(channels, architecture, dim, stride):
    layout = L.compute_layout(channels, architecture, dim, stride)
    assert not layout.adjusted
    assert layout.adjustment_message() is None
    assert layout.channels == tuple(channels)
    assert layout.mean_relative_error == 0.0
    assert all(e == 0.0 for e in layout.relative_errors)


# --------------------------------------------------------------------------
# Layout object
# --------------------------------------------------------------------------

def test_layout_fields():
    layout = L.compute_layout((7, 15, 35, 91), (2, 3, 1, 3), 3,
                              [2, 2, (1, 2, 2)])
    assert layout.dim == 3
    assert layout.architecture == (2, 3, 1, 3)
    assert layout.strides == [(2, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert layout.channel_multipliers == [8, 8, 4]
    assert layout.downsampling_factors == (4, 8, 8)
    assert layout.num_levels == 4
    assert [lv.kept for lv in layout.levels] == [5, 12, 9, 92]
    assert [lv.sent for lv in layout.levels] == [2, 4, 23, 0]
    assert layout.kept == (5, 12, 9)
    assert layout.sent == (2, 4, 23)
    bottom = layout.levels[-1]
    assert bottom == L.LevelLayout(3, 92, 3, 92, 0, None, None)
    assert layout.levels[2] == L.LevelLayout(2, 32, 1, 9, 23, (1, 2, 2), 4)
    with pytest.raises(Exception):
        layout.dim = 2  # frozen


def test_single_level_layout():
    layout = L.compute_layout((5,), (2,), 2)
    assert layout.strides == []
    assert layout.downsampling_factors == (1, 1)
    assert layout.text() == "5-5--5-5"


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "channels, dim, stride, achieved, clamped",
    [
        # would send 6 of 2 channels: clamped to 1 sent
        ((2, 24), 2, 2, (2, 4), ((0, 6, 1),)),
        # would send 8 of 4, then 100 of 6 channels
        ((4, 16, 200), 1, 2, (4, 6, 10), ((0, 8, 3), (1, 100, 5))),
        # round(1 / 8) = 0 would send nothing: clamped to 1 sent
        ((8, 1), 3, 2, (8, 8), ((0, 0, 1),)),
        # round(4 / 8) = 1 (halves round up): adjusted, not clamped
        ((4, 4), 3, 2, (4, 8), ()),
        ((8, 16, 3), 3, [2, (1, 2, 2)], (8, 16, 4), ()),
        # the reference documentation's channel example (levels 1 and 3 adjusted)
        ((3, 25, 32, 55, 128), 3, [(1, 2, 3), (2, 2, 2), (5, 1, 2), 2],
         (3, 12, 32, 60, 128), ((0, 4, 2),)),
    ],
)
def test_closest_achievable_clamps_instead_of_raising(channels, dim, stride, achieved,
                                                      clamped):
    layout = L.compute_layout(channels, (1,) * len(channels), dim, stride)
    assert layout.channels == achieved
    assert layout.clamped == clamped
    assert all(lv.kept >= 1 and lv.sent >= 1 for lv in layout.levels[:-1])
    msg = layout.adjustment_message()
    assert f"channels={achieved!r}." in msg.replace("\n", " ")
    for i, wanted, sent in clamped:
        note = f"Level {i} must send " + (
            f"at most {achieved[i] - 1} of its {achieved[i]} channels" if wanted > sent
            else "at least 1 channel")
        assert note in msg.replace("\n", " ")
        assert f"channels[{i + 1}] clamped to {achieved[i + 1]}." in msg.replace("\n", " ")
    if not clamped:
        assert "clamped" not in msg


@pytest.mark.parametrize("channels", [(1, 4), (1, 1), (1, 8, 8)])
def test_no_layout_exists_with_one_channel_at_level_0(channels):
    with pytest.raises(ValueError) as info:
        L.compute_layout(channels, (1,) * len(channels), 2, 2)
    msg = str(info.value)
    assert "channels[0] must be at least 2" in msg
    smallest = L.minimal_channels([(2, 2)] * (len(channels) - 1))
    assert f"channels={smallest!r}" in msg
    assert not L.compute_layout(smallest, (1,) * len(channels), 2, 2).adjusted


def test_one_level_with_one_channel_is_fine():
    assert L.compute_layout((1,), (2,), 2).channels == (1,)


@pytest.mark.parametrize(
    "channels, architecture, dim, needle",
    [
        ((8, 16), (1, 1, 1), 2, "same length"),
        ((), (), 2, "channels must be non-empty"),
        ((8, 16), (), 2, "architecture must be non-empty"),
        ((8, 0), (1, 1), 2, "channels[1]=0"),
        ((8, -16), (1, 1), 2, "channels[1]=-16"),
        ((8, 16), (1, 0), 2, "architecture[1]=0"),
        ((8, 16.0), (1, 1), 2, "channels[1]=16.0"),
        ((8, 16), (1, 1), 4, "dim must be 1, 2 or 3"),
        ((8, 16), (1, 1), 0, "dim must be 1, 2 or 3"),
    ],
)
def test_argument_validation(channels, architecture, dim, needle):
    with pytest.raises(ValueError) as info:
        L.compute_layout(channels, architecture, dim)
    assert needle in str(info.value)


def test_non_sequence_channels():
    with pytest.raises(TypeError, match="channels"):
        L.compute_layout(8, (1,), 2)


# --------------------------------------------------------------------------
# normalize_strides
# --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "stride, dim, n, expected",
    [
        (2, 3, 3, [(2, 2, 2)] * 3),
        (2, 1, 0, []),
        (3, 2, 2, [(3, 3)] * 2),
        ((1, 2, 2), 3, 2, [(1, 2, 2)] * 2),
        ((1, 2), 2, 2, [(1, 2)] * 2),          # tuple of dim ints: per-dim
        ([1, 2], 2, 2, None),                   # list: per level -> 1 invalid
        ([2, 3], 2, 2, [(2, 2), (3, 3)]),       # list of ints: per level
        ([2, 2, (1, 2, 2)], 3, 3, [(2, 2, 2), (2, 2, 2), (1, 2, 2)]),
        ([(2, 1), 2, [1, 3]], 2, 3, [(2, 1), (2, 2), (1, 3)]),
        ((2, 3, 2), 2, 3, [(2, 2), (3, 3), (2, 2)]),  # tuple, len != dim
        (((1, 2), 2), 2, 2, [(1, 2), (2, 2)]),        # tuple of levels
        (2, 2, 0, []),
    ],
)
def test_normalize_strides(stride, dim, n, expected):
    if expected is None:
        with pytest.raises(ValueError, match="resampling_stride"):
            L.normalize_strides(stride, dim, n)
    else:
        assert L.normalize_strides(stride, dim, n) == expected


@pytest.mark.parametrize(
    "stride, dim, n, exc, needle",
    [
        ([2, 2], 3, 3, ValueError, "3 downsamplings"),          # wrong length
        ([2, 2, 2, 2], 3, 3, ValueError, "Give exactly 3"),
        ((2, 2), 3, 3, ValueError, "tuple of 3 ints"),           # wrong arity
        ([2, (1, 2)], 3, 2, ValueError, "one entry per spatial dimension"),
        ([2, (1, 2, 2, 2)], 3, 2, ValueError, "resampling_stride[1]"),
        ([2, 2.0], 2, 2, TypeError, "resampling_stride[1]"),     # non-int
        ([2, (2, 2.5)], 2, 2, TypeError, "resampling_stride[1]"),
        ("2", 2, 1, TypeError, "resampling_stride"),
        (2.0, 2, 1, TypeError, "resampling_stride"),
        ([True, 2], 2, 2, TypeError, "resampling_stride[0]"),
        (0, 2, 1, ValueError, ">= 1"),                           # < 1
        (-2, 2, 1, ValueError, ">= 1"),
        ([2, (2, 0)], 2, 2, ValueError, ">= 1"),
        (1, 2, 1, ValueError, "would not downsample"),           # all ones
        ((1, 1, 1), 3, 2, ValueError, "would not downsample"),
        ([2, (1, 1, 1)], 3, 2, ValueError, "resampling_stride[1]"),
    ],
)
def test_normalize_strides_errors(stride, dim, n, exc, needle):
    with pytest.raises(exc) as info:
        L.normalize_strides(stride, dim, n)
    msg = str(info.value)
    assert "resampling_stride" in msg
    assert needle in msg
    assert "e.g." in msg or "Give exactly" in msg  # says what would work


def test_compute_layout_propagates_stride_errors():
    with pytest.raises(ValueError, match="resampling_stride"):
        L.compute_layout((8, 16, 32), (1, 1, 1), 3, [2, (1, 1, 1)])


# --------------------------------------------------------------------------
# slice_mode rule (old API)
# --------------------------------------------------------------------------

def _slice_mode_reference(c0, n_levels, m, factor):
    channels = [c0]
    for _ in range(n_levels - 1):
        c = channels[-1]
        kept = max(1, math.floor(c * (m - factor) / m))
        channels.append(m * (c - kept))
    return tuple(channels)


@pytest.mark.parametrize(
    "in_channels, architecture, dim, stride, mode, expected",
    [
        (64, [2, 2, 2, 2], 2, 2, "double", (64, 128, 256, 512)),
        (7, [2, 3, 1, 3], 3, 2, "double", (7, 16, 32, 64)),
        (64, [1, 1, 1], 2, 2, "constant", (64, 64, 64)),
        (3, [1, 1, 1], 1, 2, "double", (3, 4, 6)),
        (3, [1, 1, 1], 1, 2, "constant", (3, 4, 4)),
        (10, [1, 1], 3, [(1, 2, 2)], "double", (10, 20)),
    ],
)
def test_slice_mode(in_channels, architecture, dim, stride, mode, expected):
    assert L.channels_from_slice_mode(in_channels, architecture, dim, stride,
                                      mode) == expected


@pytest.mark.parametrize("mode, factor", [("double", 2), ("constant", 1)])
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("c0", [2, 3, 5, 7, 16, 33, 64, 100])
def test_slice_mode_matches_formula(mode, factor, dim, c0):
    got = L.channels_from_slice_mode(c0, [1] * 4, dim, 2, mode)
    assert got == _slice_mode_reference(c0, 4, 2 ** dim, factor)
    layout = L.compute_layout(got, [1] * 4, dim, 2)
    assert not layout.adjusted


def test_slice_mode_unknown():
    with pytest.raises(ValueError) as info:
        L.channels_from_slice_mode(8, [1, 1], 2, slice_mode="triple")
    assert "'double'" in str(info.value) and "'constant'" in str(info.value)


def test_slice_mode_docstring_documents_rule():
    doc = L.channels_from_slice_mode.__doc__
    assert "twice" in doc and "same number of channels" in doc
    assert "nearest achievable" in doc


# --------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------

REF_CHANNELS = (64, 128, 256, 512, 1024)


@pytest.mark.parametrize("blocks, reference", [(5, 32_158_080),
                                               (30, 189_390_080)])
def test_parameter_counts_vs_reference(blocks, reference):
    layout = L.compute_layout(REF_CHANNELS, [blocks] * 5, 2)
    total = L.count_parameters(layout)["total"]
    assert abs(total - reference) / reference < 0.01
    assert total == reference  # the definitions match the reference exactly


def test_parameter_count_per_unit_of_architecture():
    totals = [L.count_parameters(L.compute_layout(REF_CHANNELS, [b] * 5, 2))
              ["total"] for b in (5, 6, 7)]
    assert totals[1] - totals[0] == 6_289_280
    assert totals[2] - totals[1] == 6_289_280


def test_parameter_count_breakdown():
    layout = L.compute_layout((3, 8), (2, 1), 2)
    counts = L.count_parameters(layout)
    # level 0, c=3: index 0 -> a=2,b=1: 9*1*2+4=22; index 1 -> a=1,b=2: 18+2=20
    assert counts["levels"][0]["coupling"] == 2 * (22 + 20)
    assert counts["levels"][0]["channel_mixing"] == 2 * 9
    assert counts["levels"][0]["resampling"] == 2 * 2 * 16  # sent=2, m=4
    # level 1, c=8, one block: a=b=4: 9*16+8=152, both sides
    assert counts["levels"][1] == {"level": 1, "channels": 8,
                                   "coupling": 304, "channel_mixing": 0,
                                   "resampling": 0, "total": 304}
    assert counts["total"] == 84 + 18 + 64 + 304
    assert counts["total"] == (counts["coupling"] + counts["channel_mixing"]
                               + counts["resampling"])


def test_parameter_count_options():
    layout = L.compute_layout((4, 6, 10), (4, 4, 4), 1)
    base = L.count_parameters(layout)
    assert L.count_parameters(layout, learnable_resampling=False)["resampling"] == 0
    assert L.count_parameters(layout, learnable_channel_mixing=False)[
        "channel_mixing"] == 0
    assert L.count_parameters(layout, channel_mixing_freq=0)["channel_mixing"] == 0
    # every 2nd coupling: 2 per side at every level (incl. bottom)
    assert L.count_parameters(layout, channel_mixing_freq=2)[
        "channel_mixing"] == 2 * 2 * (16 + 36 + 100)
    assert L.count_parameters(layout, channel_mixing_freq=3)[
        "channel_mixing"] == 2 * 1 * (16 + 36 + 100)
    assert base["channel_mixing"] == 2 * (16 + 36)
    shared = L.count_parameters(layout, resampling_shared=True)
    assert shared["resampling"] == 2 * 2 * 4  # two levels, m=2, 2x2 each
    assert base["resampling"] == 2 * (3 * 4) + 2 * (5 * 4)  # sent 3 and 5
    # depth: (depth-1) * (3*a*a + 2a) more per coupling
    d2 = L.count_parameters(layout, depth=2)
    extra = sum(2 * 4 * (3 * (c // 2) ** 2 + 2 * (c // 2)) for c in (4, 6, 10))
    assert d2["coupling"] - base["coupling"] == extra
    with pytest.raises(ValueError, match="depth"):
        L.count_parameters(layout, depth=0)
    with pytest.raises(ValueError, match="channel_mixing_freq"):
        L.count_parameters(layout, channel_mixing_freq=-2)


# --------------------------------------------------------------------------
# Property check over random configurations
# --------------------------------------------------------------------------

def _random_stride(rng, dim):
    while True:
        s = tuple(rng.choice([1, 2, 3]) for _ in range(dim))
        if any(v > 1 for v in s):
            return s


@pytest.mark.parametrize("seed", range(20))
def test_random_layout_invariants(seed):
    rng = random.Random(seed)
    checked = 0
    for _ in range(100):
        dim = rng.choice([1, 2, 3])
        n = rng.randint(1, 5)
        strides = [rng.choice([2, _random_stride(rng, dim)])
                   for _ in range(n - 1)]
        channels = tuple(rng.randint(1, 300) for _ in range(n))
        arch = tuple(rng.randint(1, 4) for _ in range(n))
        if channels[0] == 1 and n > 1:  # the only case without any layout
            with pytest.raises(ValueError, match="channels\\[0\\] must be at least 2"):
                L.compute_layout(channels, arch, dim, strides)
            continue
        layout = L.compute_layout(channels, arch, dim, strides)
        checked += 1
        ms = layout.channel_multipliers
        assert layout.channels[0] == channels[0]
        assert len(layout.levels) == n
        for i, lv in enumerate(layout.levels[:-1]):
            assert lv.kept >= 1 and lv.sent >= 1
            assert lv.kept + lv.sent == lv.channels
            assert layout.channels[i + 1] == ms[i] * lv.sent
            assert lv.multiplier == ms[i]
            # greedy rounding from the achieved channels, clamped to 1..channels-1
            wanted = math.floor(channels[i + 1] / ms[i] + 0.5)
            assert lv.sent == min(max(wanted, 1), lv.channels - 1)
            # and no achievable count is nearer to the request
            best = min(range(1, lv.channels), key=lambda k: abs(ms[i] * k - channels[i + 1]))
            assert abs(ms[i] * best - channels[i + 1]) == abs(
                ms[i] * lv.sent - channels[i + 1])
        bottom = layout.levels[-1]
        assert (bottom.kept, bottom.sent, bottom.stride) == (
            bottom.channels, 0, None)
        assert layout.adjusted == (layout.channels != channels)
        rows = layout.text().split("\n")
        assert len(rows) == n and len({len(r) for r in rows}) == 1
        assert L.count_parameters(layout)["total"] > 0
    assert checked > 0


# --------------------------------------------------------------------------
# No torch
# --------------------------------------------------------------------------

def test_layout_source_does_not_import_torch():
    source = LAYOUT_PATH.read_text()
    assert not re.search(r"^\s*(import|from)\s+torch\b", source, re.M)


def test_standalone_load_does_not_import_torch():
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("layout", {str(LAYOUT_PATH)!r})
        mod = importlib.util.module_from_spec(spec)
        sys.modules["layout"] = mod
        spec.loader.exec_module(mod)
        mod.compute_layout((7, 15, 35, 91), (2, 3, 1, 3), 3, [2, 2, (1, 2, 2)])
        assert "torch" not in sys.modules, "torch was imported"
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
