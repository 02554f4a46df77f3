"""Checks of notebooks/04_memory_table.ipynb (smoke run: 128x128, delta in {1, 2})."""


def check(results: dict) -> None:
    deltas = results["deltas"]
    ratio = results["fused_over_conventional_memory"]
    runtime = results["runtime_ratio"]
    overhead = results["overhead_tensors"]
    assert len(ratio) == len(runtime) == len(overhead) == len(deltas) >= 2, results
    # memory-efficient backprop needs less memory than conventional at the largest delta (at the
    # smoke size the gradients dominate both totals, so the ratios are close to 1 and need not
    # fall with delta; the 512^2 regime is checked by the full run and tests/test_predict.py)
    assert ratio[-1] < 1.0, ratio
    assert all(r < 1.25 for r in ratio), ratio
    memcnn = results.get("memcnn_over_conventional_memory") or []
    if memcnn:
        assert memcnn[-1] < 1.0, memcnn
    conv, fused = results["conventional_total_gib"], results["fused_total_gib"]
    assert all(c > 0 for c in conv) and all(f > 0 for f in fused)
    assert conv[-1] - conv[0] > fused[-1] - fused[0] - 0.01, (conv, fused)
    # fused overhead: a handful of full-resolution tensors, nearly constant in delta
    assert all(0 < o < 25 for o in overhead), overhead
    assert max(overhead) - min(overhead) < 0.25 * max(overhead), overhead
    # runtime: positive and not absurd (one thread, timings scatter)
    assert all(0.3 < r < 6 for r in runtime), runtime
    if results.get("prediction_max_abs_error") is not None:
        assert results["prediction_max_abs_error"] < 0.25, results["prediction_max_abs_error"]
    assert isinstance(results["targets"], list)
