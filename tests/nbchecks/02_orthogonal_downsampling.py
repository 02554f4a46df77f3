"""Checks of notebooks/02_orthogonal_downsampling.ipynb (smoke run): the numbers and the sentences quoting them."""


def check(results: dict) -> None:
    rt = results["roundtrip_error"]
    assert len(rt) == 9, sorted(rt)  # 3 inits x 3 methods
    assert all(v < 1e-5 for v in rt.values()), rt
    assert results["package_difference"] < 1e-5  # the notebook's two lines == InvertibleDownsampling
    assert results["two_line_roundtrip"] < 1e-5
    assert results["haar_from_theta_error"] < 1e-12
    oe = results["orthogonality_error"]
    assert set(oe) == {"exp", "cayley", "householder"}
    assert all(len(v) == len(results["ortho_sizes"]) for v in oe.values())
    assert all(e < 1e-4 for v in oe.values() for e in v), oe

    # (a) within-block share per sub-band: pixel shuffle 3/4 everywhere, Haar 0 (average) and 1 (details),
    # and the mean over the bands is 3/4 for every orthogonal Q (the sentence in the notebook)
    cb = results["checkerboard_fraction"]
    assert all(abs(v - 0.75) < 1e-6 for v in cb["pixel_shuffle"]), cb
    assert cb["haar"][0] < 1e-6 and all(v > 1 - 1e-6 for v in cb["haar"][1:]), cb
    for name, shares in cb.items():
        assert abs(sum(shares) / 4 - 0.75) < 0.02, (name, shares)
    # (b) high-frequency share over random kernels: mean/std consistent with the samples, ranking as printed
    for name, samples in results["highfreq"].items():
        assert abs(sum(samples) / len(samples) - results["highfreq_mean"][name]) < 1e-12
    ranking = results["highfreq_ranking"]
    means = results["highfreq_mean"]
    assert [means[n] for n in ranking] == sorted(means.values())
    assert results["spread_exceeds_gap"] == (means[ranking[-1]] - means[ranking[0]]
                                             < min(results["highfreq_std"].values()))
    assert results["image_highfreq_fraction"] < min(means.values())
    share = results["energy_share"]
    assert share["haar"][0] > 0.9 and max(share["pixel_shuffle"]) < 0.3, share

    # sparsity: the learned transform lowers the 1-norm; the sentence says where it ends relative to Haar
    assert results["sparsity_loss_last"] < 0.5 * results["sparsity_loss_first"]
    text = results["sparsity_text"]
    gap = results["sparsity_loss_last"] / results["haar_detail_l1"] - 1
    assert ("above Haar" in text) == (gap > 0) and ("below Haar" in text) == (gap <= 0), (gap, text)
    assert f"{100 * abs(gap):.1f} %" in text
    matched = sum(c > 0.99 for c in results["filter_match"])
    assert f"{matched} of its 4 filters are Haar filters" in text
    assert ("Haar is a local optimum" in text) == (results["haar_improved"] == 0)

    # recommendation: consistent with the timings and errors at the largest n
    seconds = results["parametrisation_seconds"]
    fastest = min(seconds, key=lambda m: seconds[m][-1])
    assert results["fastest_large"] == fastest and f"{fastest} was fastest" in results["recommendation"]
    best = min(oe, key=lambda m: oe[m][-1])
    assert results["most_orthogonal_large"] == best
    assert results["cayley_recommended"] == (fastest == "cayley" and oe["cayley"][-1] <= 2 * oe[best][-1])
    summary = results["summary"]
    assert f"{max(rt.values()):.1e}" in summary
    assert f"{results['haar_detail_l1']:.4f}" in summary
