"""Checks of notebooks/04_memory_table.ipynb (smoke run: the committed 512x512 measurements, a tiny live grid).

The sentences of the summary are built from the recorded numbers; these checks assert that the
numbers are the committed measurements and that the relations the text states hold.
"""

MEASURED_AT_512 = {5: ("fused", "memcnn", "conventional"), 30: ("fused", "memcnn", "conventional"),
                   10: ("fused",), 20: ("fused",)}


def check(results: dict) -> None:
    table = {int(d): v for d, v in results["table_512"].items()}
    paper = {int(d): p for d, p in results["paper"].items()}
    assert sorted(table) == sorted(paper) == [5, 10, 20, 30]
    # every 512^2 cell that was measured is marked measured, the others predicted
    for d, row in table.items():
        for mode in ("fused", "memcnn", "conventional"):
            assert row[f"{mode}_measured"] == (mode in MEASURED_AT_512[d]), (d, mode, row)
        assert row["ratio_measured"] == (row["fused_measured"] and row["conventional_measured"])
        assert 0 < row["fused"] < row["memcnn"] < row["conventional"], row
        # our fused engine needs less than the paper's ME figure at every delta
        assert row["fused"] < paper[d]["me_gb"], (d, row["fused"], paper[d]["me_gb"])
    # the measured ratios fall with delta, like the paper's
    assert table[30]["fused_ratio"] < table[5]["fused_ratio"] < 0.3
    # time at 512^2: measured with the spread of several steps
    runtime = {int(d): v for d, v in results["runtime_512"].items()}
    assert sorted(runtime) == [5, 30] and all(v["repeats"] >= 2 for v in runtime.values())
    # size dependence: the weights' share falls and the fused working set in input tensors shrinks with size
    over = {int(s): v for s, v in results["fused_overhead_by_size"].items()}
    sizes = sorted(over)
    assert sizes == [64, 128, 512] and over[64] > over[128] > over[512], over
    b = results["breakdown"]
    assert b["fused/64/5"]["weights_share"] > b["fused/128/5"]["weights_share"] > b["fused/512/5"]["weights_share"]
    small = results["small_ratio"]
    assert (small > 1) == ([64, 5] in results["fused_above"]), (small, results["fused_above"])
    text = results["summary"]
    for value, fmt in ((table[5]["fused"], ".3f"), (table[30]["fused"], ".3f"), (100 * table[5]["fused_ratio"], ".1f"),
                       (100 * table[30]["fused_ratio"], ".1f"), (100 * runtime[5]["ratio"], ".0f"),
                       (100 * small, ".1f")):
        assert format(value, fmt) in text, (format(value, fmt), text)
    # the predictor's errors against the committed measurements, as quoted
    for mode, err in results["prediction_max_abs_error"].items():
        assert 0 <= err < 0.25, (mode, err)
        assert f"{mode} {100 * err:.1f} %" in text
    # the live (smoke) grid: positive totals and times
    live = results["live"]
    assert live, "nothing was measured live"
    assert all(v["total_bytes"] > 0 and v["seconds"] > 0 for v in live.values()), live
