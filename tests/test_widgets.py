"""Tests of the layout explorer (iunet_nb.notebook.explorer), driven from Python.

The widgets are changed the way the frontend changes them (setting
``widget.value``), and the rendered texts are compared with the layouts and
adjustment messages that the reference README's 2D and 3D examples print.
"""

from __future__ import annotations

import pytest

pytest.importorskip("ipywidgets")

from iunet_nb.notebook import explorer as W  # noqa: E402
from iunet_nb.arch.layout import compute_layout, count_parameters  # noqa: E402
from iunet_nb.common import GiB  # noqa: E402
from iunet_nb.measure.predict import max_batch_size as MAX_BATCH  # noqa: E402
from iunet_nb.measure.predict import predict_step_memory as PREDICT  # noqa: E402

README_2D = """\
64-64-(32/32)--------------------------------------------------------(32/32)-64-64
---------128-128-(64/64)---------------------------------(64/64)-128-128----------
---------------------256-256-(160/96)--------(160/96)-256-256---------------------
---------------------------------384-384--384-384---------------------------------"""

README_3D = """\
7-7-(5/2)-------------------------------------------------(5/2)-7-7
------16-16-16-(12/4)------------------------(12/4)-16-16-16-------
------------------32-(9/23)------------(9/23)-32-------------------
------------------------92-92-92--92-92-92-------------------------"""

README_3D_MESSAGE_HEAD = """\
Could not exactly create an iUNet with channels=(7, 15, 35, 91) and
resampling_stride=[(2, 2, 2), (2, 2, 2), (1, 2, 2)]. Instead using closest
achievable configuration: channels=(7, 16, 32, 92)."""


@pytest.fixture
def explorer():
    return W.LayoutExplorer(predictor=PREDICT)


def set_values(ex, **values):
    for name, value in values.items():
        ex.controls[name].value = value


# -- pure rendering ---------------------------------------------------------

def test_explore_readme_2d_layout_and_parameters():
    state = W.explore(dict(channels="64, 128, 256, 384", architecture="2, 2, 2, 2",
                           dim=2), predictor=PREDICT)
    assert state.ok and state.error is None
    assert state.layout_text == README_2D
    assert state.adjustment_message is None
    layout = compute_layout((64, 128, 256, 384), (2, 2, 2, 2), 2)
    assert state.parameters == count_parameters(layout)["total"] == 2282752
    assert set(state.memory_bytes) == set(W.MODES)
    assert state.input_shape == (1, 64, 256, 256)
    for mode in W.MODES:
        assert mode in state.memory_text


def test_explore_readme_3d_adjustment_message():
    state = W.explore(dict(channels=(7, 15, 35, 91), architecture=(2, 3, 1, 3),
                           dim=3, strides="2, 2, (1, 2, 2)", depth=3,
                           input_size="16, 64, 64"), predictor=PREDICT)
    assert state.ok
    assert state.layout_text == README_3D
    assert state.adjustment_message.startswith(README_3D_MESSAGE_HEAD)
    assert "Average relative error: 0.0545" in state.adjustment_message
    assert state.channels == (7, 16, 32, 92)


@pytest.mark.parametrize("text, expected", [
    ("2", 2),
    ("(1, 2, 2)", (1, 2, 2)),
    ("2, 2, (1, 2, 2)", [2, 2, (1, 2, 2)]),
    ("[2, 2, (1,2,2)]", [2, 2, (1, 2, 2)]),
    ("2, 2", [2, 2]),
])
def test_parse_strides(text, expected):
    assert W.parse_strides(text) == expected


@pytest.mark.parametrize("config, fragment", [
    (dict(channels="64, 128, 256, 512", architecture="2, 2, 2, 2", dim=2,
          strides="2, 2, (1, 2, 2)"), "per-dimension stride"),
    (dict(channels="1, 64", architecture="1, 1", dim=2), "channels[0] must be at least 2"),
    (dict(channels="1, 8, 16", architecture="1, 1, 1", dim=2), "channels[0] must be at least 2"),
    (dict(channels="64, 128, abc", architecture="1, 1, 1"), "Could not read channels"),
    (dict(channels="64, 128", architecture="1, 1, 1"), "same length"),
    (dict(channels="64, 128", architecture="1, 1", dim=2, strides="1"), "would not downsample"),
])
def test_explore_errors_are_messages_not_exceptions(config, fragment):
    state = W.explore(config, predictor=PREDICT)
    assert not state.ok
    assert fragment in state.error
    assert state.layout_text == "" and state.memory_bytes == {}


def test_explore_old_api_slice_mode():
    state = W.explore(dict(api="in_channels", in_channels=64, slice_mode="double",
                           architecture="2, 2, 2, 2", dim=2), predictor=PREDICT)
    assert state.channels == (64, 128, 256, 512)
    state = W.explore(dict(api="in_channels", in_channels=7, slice_mode="double",
                           architecture="2, 3, 1, 3", dim=3), predictor=PREDICT)
    assert state.channels == (7, 16, 32, 64)
    assert state.layout_text.splitlines()[2].strip("-") == "32-(24/8)------------(24/8)-32"
    state = W.explore(dict(api="in_channels", in_channels=8, slice_mode="constant",
                           architecture="1, 1, 1", dim=2), predictor=PREDICT)
    assert state.channels == (8, 8, 8)


def test_explore_budget_gives_max_batch_size():
    # Default predictor: iunet_nb.measure.predict; the largest batches agree with its max_batch_size.
    state = W.explore(dict(input_size="128", budget_gib=2.0))
    n = state.max_batch_size
    assert set(n) == set(W.MODES)
    assert n["fused"] >= n["conventional"] >= 1
    budget = int(2.0 * GiB)
    for mode in W.MODES:
        assert n[mode] == MAX_BATCH(state.layout, (1, 64, 128, 128), "float32", mode, budget)
        fits = PREDICT(state.layout, (n[mode], 64, 128, 128), "float32", mode).total
        too_big = PREDICT(state.layout, (n[mode] + 1, 64, 128, 128), "float32", mode).total
        assert fits <= budget < too_big
    assert "Largest batch size within 2 GiB" in state.memory_text
    # The same with the predictor passed explicitly.
    state2 = W.explore(dict(input_size="128", budget_gib=2.0), predictor=PREDICT)
    assert state2.max_batch_size == n


def test_explore_memory_matches_predictor():
    state = W.explore(dict(dim=3, channels="7, 15, 35, 91", architecture="2, 3, 1, 3",
                           strides="2, 2, (1, 2, 2)", depth=3, input_size="30, 100, 100",
                           batch_size=2, dtype="bfloat16"))
    assert state.input_shape == (2, 7, 30, 100, 100)
    assert state.padded_shape == (2, 7, 32, 104, 104)
    assert any("pads it to (32, 104, 104)" in n for n in state.notes)
    for mode in W.MODES:
        expected = PREDICT(state.layout, (2, 7, 30, 100, 100), "bfloat16", mode, depth=3)
        assert state.memory_bytes[mode] == expected.total
        assert f"{expected.total:,d}" in state.memory_text


def test_memory_figure_has_labelled_axes():
    state = W.explore(dict(budget_gib=1.0), predictor=PREDICT)
    fig = W.memory_figure(state)
    ax = fig.axes[0]
    assert "GiB" in ax.get_ylabel() and ax.get_xlabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == list(W.MODES)


# -- the widget -----------------------------------------------------------------

def test_widget_renders_readme_layout(explorer):
    assert explorer.state.layout_text == README_2D
    assert "iunet-layout" in explorer.layout_html._dom_classes
    assert "iunet-memory" in explorer.memory_html._dom_classes
    assert "384-384--384-384" in explorer.layout_html.value
    assert "conventional" in explorer.memory_html.value
    assert explorer.chart.value[:4] == b"\x89PNG"
    descriptions = {name: c.description for name, c in explorer.controls.items()}
    assert descriptions["channels"] == "Channels"
    assert descriptions["architecture"] == "Architecture"
    assert descriptions["strides"] == "Strides"


def test_widget_change_to_readme_3d(explorer):
    set_values(explorer, dim=3, depth=3, input_size="16, 64, 64")
    set_values(explorer, channels="7, 15, 35, 91")
    set_values(explorer, architecture="2, 3, 1, 3")
    assert "keeping zero channels" not in explorer.state.message_text
    set_values(explorer, strides="2, 2, (1, 2, 2)")
    assert explorer.state.layout_text == README_3D
    assert "Average relative error: 0.0545" in explorer.message_html.value
    assert "iunet-adjustment" in explorer.message_html.value
    assert explorer.state.input_shape == (1, 7, 16, 64, 64)


def test_widget_impossible_layout_shows_error(explorer):
    set_values(explorer, channels="1, 1000, 256, 384")
    assert not explorer.state.ok
    assert "iunet-error" in explorer.message_html.value
    assert "channels[0] must be at least 2" in explorer.message_html.value
    assert "Traceback" not in explorer.message_html.value
    assert "no layout" in explorer.layout_html.value
    assert explorer.build_button.disabled
    set_values(explorer, channels="64, 128, 256, 384")
    assert explorer.state.ok and not explorer.build_button.disabled
    assert explorer.message_html.value == ""


def test_widget_memory_grows_with_architecture(explorer):
    before = dict(explorer.state.memory_bytes)
    text_before = explorer.memory_html.value
    params_before = explorer.state.parameters
    set_values(explorer, architecture="3, 3, 3, 3")
    assert explorer.state.layout_text.splitlines()[0].startswith("64-64-64-(32/32)")
    assert explorer.state.parameters > params_before
    assert explorer.memory_html.value != text_before
    assert explorer.state.memory_bytes["conventional"] > before["conventional"]
    for mode in W.MODES:
        assert explorer.state.memory_bytes[mode] >= before[mode]


def test_widget_levels_resize_fields(explorer):
    set_values(explorer, strides="2, 2, (2, 1)")
    set_values(explorer, levels=5)
    # the new level 4 gets m_3 * (384 // 2) = 2 * 192 channels
    assert explorer.controls["channels"].value == "64, 128, 256, 384, 384"
    assert explorer.controls["architecture"].value == "2, 2, 2, 2, 2"
    assert explorer.controls["strides"].value == "2, 2, (2, 1), (2, 1)"
    assert explorer.state.ok and explorer.state.layout.num_levels == 5
    set_values(explorer, strides="2")
    set_values(explorer, levels=6)
    assert explorer.controls["channels"].value == "64, 128, 256, 384, 384, 768"
    assert explorer.state.ok and explorer.state.layout.num_levels == 6
    set_values(explorer, architecture="1, 1, 1")
    assert explorer.controls["levels"].value == 3
    assert explorer.controls["channels"].value == "64, 128, 256"
    assert explorer.state.ok and explorer.state.layout.num_levels == 3


def test_widget_old_api_and_dtype(explorer):
    f32 = explorer.state.memory_bytes["fused"]
    set_values(explorer, dtype="float64")
    assert explorer.state.memory_bytes["fused"] > f32
    set_values(explorer, api="in_channels", in_channels=64)
    assert explorer.controls["channels"].layout.display == "none"
    assert explorer.state.channels == (64, 128, 256, 512)
    set_values(explorer, slice_mode="constant")
    assert explorer.state.channels == (64, 64, 64, 64)


@pytest.mark.slow
def test_build_button_reconstructs(explorer):
    set_values(explorer, dim=3, depth=3, channels="7, 15, 35, 91",
               architecture="2, 3, 1, 3", strides="2, 2, (1, 2, 2)")
    explorer.build_button.click()
    result = explorer.last_build
    assert result is not None, explorer.build_html.value
    assert result.reconstruction_error < 1e-5
    assert result.input_shape == (1, 7, 4, 8, 8)
    assert result.actual_parameters == result.predicted_parameters == explorer.state.parameters
    assert "Reconstruction error" in explorer.build_html.value


def test_build_and_check_readme_2d():
    result = W.build_and_check(dict(channels="64, 128, 256, 384",
                                    architecture="2, 2, 2, 2", dim=2))
    assert result.reconstruction_error < 1e-5
    assert result.actual_parameters == result.predicted_parameters == 2282752
    assert "matches the prediction" in result.text()


def test_build_and_check_rejects_impossible_layout():
    with pytest.raises(ValueError, match=r"channels\[0\] must be at least 2"):
        W.build_and_check(dict(channels="1, 64", architecture="1, 1"))
