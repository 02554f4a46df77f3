"""Checks of notebooks/06_ct_postprocessing.ipynb (smoke run: 16x16 images, 2 epochs).

A smoke run cannot show that the networks learn much (the defaults' gain over FBP is checked on
the committed outputs by tests/test_ct.py::test_committed_notebook_results); it can show that the
pipeline is consistent: metrics in range, both networks start from the FBP and were not wrecked
by training, matched sizes, the training loop's held-out FBP metric equal to the notebook's.
"""
import math

KEYS = ("psnr_fbp", "psnr_unet", "psnr_iunet", "ssim_fbp", "ssim_unet", "ssim_iunet")


def check(results: dict) -> None:
    for key in KEYS:
        assert isinstance(results[key], float) and math.isfinite(results[key]), (key, results.get(key))
    for key in ("psnr_fbp", "psnr_unet", "psnr_iunet"):
        assert 3.0 < results[key] < 60.0, (key, results[key])
    for key in ("ssim_fbp", "ssim_unet", "ssim_iunet"):
        assert 0.0 < results[key] <= 1.0, (key, results[key])
    # the loop's per-epoch evaluation and the notebook's own agree on the FBP (same held-out images)
    assert abs(results["history_psnr_fbp"] - results["psnr_fbp"]) < 1e-9
    # both start as the identity (= FBP) and a few small Adam steps must not make them much worse
    assert results["psnr_iunet"] > results["psnr_fbp"] - 1.0, results
    assert results["psnr_unet"] > results["psnr_fbp"] - 1.0, results
    # the final held-out PSNR is the last epoch's
    assert abs(results["history_psnr_iunet"][-1] - results["psnr_iunet"]) < 1e-9
    assert 0.7 < results["params_unet"] / results["params_iunet"] < 1.3, results
    assert all(math.isfinite(v) and v > 0 for v in results["train_loss_iunet"] + results["train_loss_unet"])
    noisy, full = results["example_fbp_psnr"]["sparse_noisy"], results["example_fbp_psnr"]["full_noiseless"]
    assert noisy["psnr"] < full["psnr"], results["example_fbp_psnr"]
