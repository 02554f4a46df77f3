"""Checks on the results of notebooks/03_layout_explorer.ipynb.

tests/test_notebooks.py runs the notebook with papermill parameters
``{'SMOKE': True, 'RESULTS_JSON': path}``, loads the JSON and calls
:func:`check`.
"""

README_2D_LAYOUT = """\
64-64-(32/32)--------------------------------------------------------(32/32)-64-64
---------128-128-(64/64)---------------------------------(64/64)-128-128----------
---------------------256-256-(160/96)--------(160/96)-256-256---------------------
---------------------------------384-384--384-384---------------------------------"""

ADJUSTED_HEAD = """\
Could not exactly create an iUNet with channels=(7, 15, 35, 91) and
resampling_stride=[(2, 2, 2), (2, 2, 2), (1, 2, 2)]. Instead using closest
achievable configuration: channels=(7, 16, 32, 92)."""

MODES = ("conventional", "fused", "memcnn")


def check(results: dict) -> None:
    # The layout of the reference README's 2D example, character for character.
    assert results["layout_text"] == README_2D_LAYOUT, results["layout_text"]
    assert results["explorer_layout_text"] == README_2D_LAYOUT

    # The closest-achievable message of its 3D example (strides [2, 2, (1, 2, 2)]).
    message = results["adjusted_message"]
    assert message.startswith(ADJUSTED_HEAD), message
    assert "Average relative error: 0.0545" in message
    assert results["adjusted_channels"] == [7, 16, 32, 92]

    # Parameters: predicted from the layout == counted on the built model.
    assert results["parameters"] == 2282752
    assert results["build_check_parameters"] == results["parameters"]

    # Predicted memory for all three modes, in bytes, of a 1x64x256x256 float32 step.
    memory = results["predicted_memory"]
    assert set(memory) == set(MODES), memory
    assert results["memory_input_shape"] == [1, 64, 256, 256]
    weights = 4 * results["parameters"]
    for mode in MODES:
        assert isinstance(memory[mode], int)
        # At least weights + gradients, and far below a terabyte.
        assert 2 * weights < memory[mode] < 2**40, (mode, memory[mode])
    # The point of the paper: memory-efficient steps need less than conventional.
    assert memory["fused"] < memory["conventional"]
    assert memory["memcnn"] < memory["conventional"]

    # More coupling layers: conventional memory grows faster than fused.
    sweep = {int(d): v for d, v in results["sweep"].items()}
    lo, hi = min(sweep), max(sweep)
    assert hi > lo
    grow_conv = sweep[hi]["conventional"] - sweep[lo]["conventional"]
    grow_fused = sweep[hi]["fused"] - sweep[lo]["fused"]
    assert grow_conv > grow_fused > 0

    # Build and check: the built model inverts its forward pass.
    assert results["build_check_error"] < 1e-5
    assert results["build_check_error_3d"] < 1e-5

    # The paper's model: the predicted parameters are the paper's (32,158,080 at delta 5), and the
    # sentence quotes the predicted ratios beside the paper's.
    params = {int(d): p for d, p in results["sweep_parameters"].items()}
    assert params[5] == 32_158_080 and params[30] == 189_390_080, params
    for d in (lo, hi):
        ratio = sweep[d]["fused"] / sweep[d]["conventional"]
        assert f"{100 * ratio:.1f} %" in results["summary"], (d, ratio)
        assert f"{results['paper'][str(d)]['ratio_percent']:.1f} %" in results["summary"]
    # the predictor is for the CPU meter; the text expects the paper's GPU figures to be higher
    for d in sweep:
        p = results["paper"][str(d)]
        assert sweep[d]["fused"] / 2**30 < p["me_gb"] and sweep[d]["conventional"] / 2**30 < p["conventional_gb"]

    # bfloat16: the round trip is off by about the input's own bfloat16 rounding, not float32's 1e-7
    rt = results["roundtrip"]
    assert rt["float32"] < 1e-5
    assert 10 * rt["float32"] < rt["bfloat16"] < 5 * results["bf16_input_rounding"], rt
    assert f"{rt['bfloat16']:.1e}" in results["summary"]
