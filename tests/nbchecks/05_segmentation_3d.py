"""Checks of notebooks/05_segmentation_3d.ipynb: Dice, step memory and the largest trainable volume."""
import math

KEYS = ("dice_iunet", "dice_unet", "peak_mib_iunet", "peak_mib_unet", "max_volume_iunet", "max_volume_unet")


def _check_search(res: dict, budget_mib: float) -> None:
    budget = budget_mib * 2**20
    checks = {int(s): t for s, t in res["checks"]}
    assert checks, "the predicted size was never verified by a measured step"
    size = res["size"]
    assert size > 0 and size in checks and checks[size] <= budget, res
    assert res["measured_bytes"] == checks[size]
    # the next size up was measured and does not fit (so `size` is the largest of the walk)
    assert size + 4 in checks and checks[size + 4] > budget, res


def check(results: dict) -> None:
    for key in KEYS:
        assert key in results and results[key] is not None, key
    for key in ("dice_iunet", "dice_unet"):
        assert 0.0 <= results[key] <= 1.0, (key, results[key])
    assert all(0.0 <= d <= 1.0 for d in results["dice_voxelwise"])
    # the iUNet body starts as the identity (zero-initialised coupling outputs)
    assert results["identity_error"] < 1e-4, results["identity_error"]
    assert 0.5 < results["params"]["iunet"] / results["params"]["unet"] < 2, results["params"]
    # memory: a smaller step peak and a larger trainable volume, each measured
    assert 0 < results["peak_mib_iunet"] < results["peak_mib_unet"], (results["peak_mib_iunet"],
                                                                     results["peak_mib_unet"])
    for arch in ("iunet", "unet"):
        _check_search(results["search"][arch], results["budget_mib"])
    assert results["max_volume_iunet"] > results["max_volume_unet"] > 0
    # the loss went down for both networks
    for arch, hist in results["histories"].items():
        assert math.isfinite(hist[-1]["train_loss"]) and hist[-1]["train_loss"] < hist[0]["train_loss"], arch
    if not results["smoke"]:
        assert results["dice_iunet"] >= 0.8, results["dice_iunet"]
        # the class that needs context: both networks beat the voxel-wise rule there
        assert results["dice_per_class_iunet"][0] > results["dice_voxelwise"][0]
        assert results["seconds"] < 300, results["seconds"]
