"""Checks of notebooks/00_quickstart.ipynb (smoke run): the numbers and the sentences that quote them."""

# First line of the printed layout in the reference README's 2D example.
SEED_FIRST_LINE = "64-64-(32/32)--------------------------------------------------------(32/32)-64-64"
ENGINES = {"conventional", "fused", "memcnn"}


def check(results: dict) -> None:
    assert results["roundtrip_error_2d"] < 1e-5, results["roundtrip_error_2d"]
    assert results["roundtrip_error_3d"] < 1e-5, results["roundtrip_error_3d"]
    layout = results["layout_text_2d"].splitlines()
    assert layout[0] == SEED_FIRST_LINE, layout[0]
    assert len(layout) == 4
    assert results["channels_3d"] == [7, 16, 32, 92]
    # 0.0545 (levels 1-3, ours) and 0.0508 (levels 0-2, the reference), computed from the channels
    assert f"{results['error_changed_levels']:.4f}" == "0.0545"
    assert f"{results['error_reference']:.4f}" == "0.0508"

    # training: the loop in the notebook and iunet_nb.notebook.training.train give the same losses
    assert results["loop_vs_package"] < 1e-6, results["loop_vs_package"]
    history = results["loss_history"]
    k = max(1, len(history) // 5)
    assert sum(history[-k:]) / k < 0.95 * sum(history[:k]) / k, "training did not lower the loss by 5 %"
    # baselines: doing nothing costs sigma^2 = 0.25; the Wiener filter is the optimum the text says it is
    assert abs(results["mse_identity"] - 0.25) < 0.02, results["mse_identity"]
    expected = results["mse_wiener_expected"]
    assert abs(results["mse_wiener"] - expected) < 0.2 * expected, (results["mse_wiener"], expected)
    assert results["mse_wiener"] <= 1.02 * results["mse_iunet"] < results["mse_identity"], results

    # memory: parts add up, memory-efficient engines below conventional at every size
    sizes = [str(s) for s in results["memory_sizes"]]
    for s in sizes:
        parts, total = results["memory_parts"][s], results["memory_total"][s]
        assert set(parts) == ENGINES
        for e in ENGINES:
            assert sum(parts[e].values()) == total[e] > 0
        assert total["fused"] < total["conventional"] and total["memcnn"] < total["conventional"], total
    r0, r1 = results["ratio"][sizes[0]]["fused"], results["ratio"][sizes[-1]]["fused"]
    trend = results["ratio_trend"]
    if abs(r1 - r0) < 0.05:
        assert trend == "hardly changes with the size"
    else:
        assert trend == ("falls with the size" if r1 < r0 else "rises with the size"), (r0, r1, trend)

    # the summary quotes exactly the recorded numbers
    text = results["summary"]
    for value, fmt in ((results["mse_iunet"], ".4f"), (results["mse_identity"], ".4f"),
                       (results["mse_wiener"], ".4f"), (results["error_changed_levels"], ".4f"),
                       (results["error_reference"], ".4f"), (results["roundtrip_error_2d"], ".1e"),
                       (100 * r1, ".0f"), (100 * r0, ".0f"),
                       (results["mse_iunet"] / results["mse_wiener"], ".2f")):
        assert format(value, fmt) in text, (format(value, fmt), text)
    assert trend in text
