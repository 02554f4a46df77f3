"""Checks of notebooks/07_normalizing_flow.ipynb: log-det bookkeeping and bits/dim."""
import math


def check(results: dict) -> None:
    for key in ("bpd_iunet", "bpd_baseline", "bpd_uniform"):
        assert key in results and math.isfinite(results[key]), key
    assert abs(results["bpd_uniform"] - math.log2(17)) < 1e-12
    # the flow's log-determinant equals the autograd Jacobian's; the iUNet alone preserves volume
    assert results["logdet_error"] < 1e-8, results["logdet_error"]
    assert abs(results["logdet_iunet"]) < 1e-6, results["logdet_iunet"]
    assert abs(results["logdet_flow"]) > 1, "the test flow's log-determinant should be non-trivial"
    assert results["bpd_histogram"] < results["bpd_uniform"]
    assert results["bpd_iunet"] < results["bpd_uniform"], results["bpd_iunet"]
    assert results["bpd_baseline"] < results["bpd_uniform"], results["bpd_baseline"]
    # each history's held-out bits/dim ends below where it started
    for arch, hist in results["histories"].items():
        assert hist[-1]["bpd"] < hist[0]["bpd"] or len(hist) == 1, arch
    if not results["smoke"]:
        assert results["bpd_uniform"] - results["bpd_iunet"] >= 0.5, results["bpd_iunet"]
        assert 0.5 < results["params_iunet"] / results["params_baseline"] < 2
        assert results["seconds"] < 300, results["seconds"]
