"""Checks of notebooks/01_coupling_layers.ipynb (smoke run): the numbers and the sentences that quote them."""

EPS32, EPS64 = 2.0**-24, 2.0**-53


def check(results: dict) -> None:
    assert results["single_coupling_error"] < 1e-5
    assert results["package_difference"] < 1e-6  # the notebook's six lines == AdditiveCoupling
    assert results["memcnn_inverse_error"] < 1e-12
    assert results["memcnn_grad_max_abs_diff"] < 1e-12 * results["memcnn_grad_scale"]
    assert results["memcnn_input_freed"] is True
    e32, e64 = results["recon_error_float32"], results["recon_error_float64"]
    r32, r64 = results["relative_float32"], results["relative_float64"]
    assert len(e32) == len(e64) == len(r32) == len(results["recon_depths"]) >= 3
    # relative errors are what the figure plots: the error divided by the largest activation
    for e, s, r in zip(e32, results["activation_scale"], r32):
        assert abs(e / s - r) <= 1e-12 * r
    # one layer: about one rounding; deeper: the error grows ("the network amplifies the error")
    assert r32[0] < 4 * EPS32 and r64[0] < 4 * EPS64, (r32[0], r64[0])
    assert r32[-1] > r32[0] and r64[-1] > r64[0]
    # "both precisions lose accuracy at about the same rate in units of their own roundoff"
    growth32, growth64 = r32[-1] / r32[0], r64[-1] / r64[0]
    assert 1 / 3 < growth32 / growth64 < 3, (growth32, growth64)
    # dropout: a fresh mask breaks the inverse, the replayed one does not
    assert results["dropout_error_fresh"] > 1e-2 > 1e-5 > results["dropout_error_replayed"]
    # float64 gradients of the fused engine equal conventional ones (relative to their size)
    assert results["grad_max_abs_diff"] < 1e-12 * max(1.0, results["grad_scale"]), results["grad_max_abs_diff"]
    conv, fused = results["memory_conventional"], results["memory_fused"]
    assert len(conv) == len(fused) == len(results["memory_depths"]) >= 3
    assert all(f < c for f, c in zip(fused, conv)), (fused, conv)
    act_c, act_f = results["activation_conventional"], results["activation_fused"]
    growth_c, growth_f = act_c[-1] - act_c[0], act_f[-1] - act_f[0]
    assert growth_c > 0
    assert growth_f < 0.25 * growth_c, (growth_f, growth_c)
    assert results["final_ratio"] < results["first_ratio"] < 1
    # the summary quotes the recorded numbers
    text = results["summary"]
    slope = results["slope"]
    for value, fmt in ((slope["conventional"], ".2f"), (slope["fused"], ".3f"), (results["weight_slope"], ".3f"),
                       (100 * results["first_ratio"], ".0f"), (100 * results["final_ratio"], ".0f"),
                       (results["grad_scale"], ".1f"), (results["dropout_error_fresh"], ".1e"),
                       (r32[-1] / EPS32, ".0f"), (r64[-1] / EPS64, ".0f")):
        assert format(value, fmt) in text, (format(value, fmt), text)
