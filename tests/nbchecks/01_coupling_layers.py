"""Checks of notebooks/01_coupling_layers.ipynb (smoke run)."""


def check(results: dict) -> None:
    assert results["single_coupling_error"] < 1e-5
    assert results["memcnn_inverse_error"] < 1e-12
    assert results["memcnn_grad_max_abs_diff"] < 1e-9
    assert results["memcnn_input_freed"] is True
    e32, e64 = results["recon_error_float32"], results["recon_error_float64"]
    assert len(e32) == len(e64) == len(results["recon_depths"]) >= 3
    assert all(a < 1e-2 for a in e32), e32
    assert all(b < 1e-10 for b in e64), e64
    assert all(b < a for a, b in zip(e32, e64) if a > 0), (e32, e64)
    assert e32[-1] > e32[0], "float32 error should grow with depth"
    # float64 gradients of the fused engine equal conventional ones (relative to their size)
    assert results["grad_max_abs_diff"] < 1e-10 * max(1.0, results["grad_scale"]), results["grad_max_abs_diff"]
    conv, fused = results["memory_conventional"], results["memory_fused"]
    assert len(conv) == len(fused) == len(results["memory_depths"]) >= 3
    assert all(f < c for f, c in zip(fused, conv)), (fused, conv)
    act_c, act_f = results["activation_conventional"], results["activation_fused"]
    growth_c, growth_f = act_c[-1] - act_c[0], act_f[-1] - act_f[0]
    assert growth_c > 0
    assert growth_f < 0.5 * growth_c, (growth_f, growth_c)
