"""Checks of notebooks/02_orthogonal_downsampling.ipynb (smoke run)."""


def check(results: dict) -> None:
    rt = results["roundtrip_error"]
    assert len(rt) == 9, sorted(rt)  # 3 inits x 3 methods
    assert all(v < 1e-5 for v in rt.values()), rt
    assert results["haar_from_theta_error"] < 1e-12
    assert results["sparsity_loss_last"] < 0.5 * results["sparsity_loss_first"]
    oe = results["orthogonality_error"]
    assert set(oe) == {"exp", "cayley", "householder"}
    assert all(len(v) == len(results["ortho_sizes"]) for v in oe.values())
    assert all(e < 1e-4 for v in oe.values() for e in v), oe
    cb = results["checkerboard_fraction"]
    assert abs(cb["pixel_shuffle"] - 0.75) < 1e-6 and cb["haar"] < 1e-6, cb
    mo = results["moire_highfreq_fraction"]
    assert mo["pixel_shuffle"] > mo["haar"], mo
    share = results["energy_share"]
    assert share["haar"][0] > 0.9 and max(share["pixel_shuffle"]) < 0.3, share
