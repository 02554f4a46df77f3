"""Foam phantoms, simulated CT and the ``ct`` task's models (:mod:`iunet_nb.apps.phantoms`, ``.ct``)."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio

from iunet_nb.apps.ct import TASK, build_model, image_metrics, make_data, matched_unet_width
from iunet_nb.apps.phantoms import foam_phantom, simulate_fbp
from iunet_nb.train import parse_options
from iunet_nb.nn.wrappers import ChannelLift


@pytest.mark.parametrize("dim, size, seed", [(2, 32, 0), (2, 64, 1), (2, 128, 2), (3, 24, 3), (3, 40, 4)])
def test_voids_do_not_overlap_and_stay_inside(dim, size, seed):
    phantom, voids = foam_phantom(size, dim, seed=seed, return_voids=True)
    assert phantom.shape == (size,) * dim and phantom.dtype == np.float32
    assert set(np.unique(phantom)) <= {0.0, 1.0}
    assert len(voids.radii) >= 20  # a foam, not a few holes
    c, r = voids.centres, voids.radii
    gaps = np.linalg.norm(c[:, None] - c[None], axis=-1) - (r[:, None] + r[None])
    np.fill_diagonal(gaps, np.inf)
    assert gaps.min() >= 1.0 - 1e-9  # at least one pixel of material between two voids
    axis = (size - 1) / 2
    assert np.all(np.linalg.norm(c[:, -2:] - axis, axis=1) + r <= 0.45 * size - 1.0 + 1e-9)
    # every void centre is empty, material remains between voids
    for centre in np.round(c).astype(int):
        assert phantom[tuple(centre)] == 0.0
    assert 0.1 < phantom.mean() < 0.7


def test_voids_rasterised_with_their_volume():
    phantom, voids = foam_phantom(128, 2, n_voids=30, seed=5, return_voids=True)
    disc = foam_phantom(128, 2, n_voids=0, seed=5)
    removed = disc.sum() - phantom.sum()
    assert removed == pytest.approx(np.sum(np.pi * voids.radii ** 2), rel=0.05)


def test_phantoms_differ_by_seed_and_repeat_by_seed():
    assert np.array_equal(foam_phantom(32, seed=1), foam_phantom(32, seed=1))
    assert not np.array_equal(foam_phantom(32, seed=1), foam_phantom(32, seed=2))


def test_fbp_of_noiseless_full_angle_data_is_close_to_the_phantom():
    disc = foam_phantom(64, n_voids=0)
    assert peak_signal_noise_ratio(disc, simulate_fbp(disc, 128, photons=None), data_range=1.0) > 22.0
    phantom = foam_phantom(64, seed=0)
    full = simulate_fbp(phantom, n_angles=128, photons=None)
    # binary edges blur by about a pixel; away from them FBP is accurate
    assert np.median(np.abs(full - phantom)) < 0.05
    assert abs(full.mean() - phantom.mean()) < 0.01
    sparse_noisy = simulate_fbp(phantom, n_angles=16, photons=1e3, seed=0)
    assert peak_signal_noise_ratio(phantom, sparse_noisy, data_range=1.0) < \
        peak_signal_noise_ratio(phantom, full, data_range=1.0) - 5.0


def test_noise_is_poisson_and_seeded():
    phantom = foam_phantom(32, seed=0)
    a, b = simulate_fbp(phantom, 16, 1e3, seed=0), simulate_fbp(phantom, 16, 1e3, seed=0)
    assert np.array_equal(a, b)
    clean = simulate_fbp(phantom, 16, None)
    low, high = simulate_fbp(phantom, 16, 1e2, seed=1), simulate_fbp(phantom, 16, 1e4, seed=1)
    # Poisson: 100x the photons, about 10x less noise
    ratio = np.std(low - clean) / np.std(high - clean)
    assert 6 < ratio < 14, ratio


def test_3d_is_reconstructed_slice_by_slice():
    volume = foam_phantom(24, 3, seed=0)
    fbp = simulate_fbp(volume, 12, photons=None)
    assert fbp.shape == volume.shape
    np.testing.assert_array_equal(fbp[7], simulate_fbp(volume[7], 12, photons=None))


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=4), "size must be an int >= 8"),
    (dict(size=32, dim=4), "dim must be 2 or 3"),
    (dict(size=32, radius_range=(3, 20)), "does not fit"),
])
def test_bad_phantom_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        foam_phantom(**kwargs)


def test_bad_simulation_arguments():
    with pytest.raises(ValueError, match="n_angles"):
        simulate_fbp(np.zeros((16, 16)), 0)
    with pytest.raises(ValueError, match="photons"):
        simulate_fbp(np.zeros((16, 16)), 4, photons=-1)
    with pytest.raises(ValueError, match="phantom must be"):
        simulate_fbp(np.zeros((16, 8)), 4)


def test_datasets_are_disjoint_and_deterministic():
    opts = parse_options(TASK, size=16, n_train=4, n_val=3, angles=8)
    train, val = TASK.datasets(opts)
    assert len(train) == 4 and len(val) == 3
    fbp, phantom = train[0]
    assert fbp.shape == phantom.shape == (1, 16, 16)
    assert not any(torch.equal(train[i][1], val[j][1]) for i in range(4) for j in range(3))
    make_data.cache_clear()
    assert torch.equal(TASK.datasets(opts)[1][2][0], val[2][0])


@pytest.mark.parametrize("dim", [2, 3])
def test_models_start_as_identity_with_matched_size(dim):
    opts = parse_options(TASK, dim=dim, size=16, channels=[8, 16, 32], architecture=[1, 1, 1])
    x = torch.randn(2, 1, *(16,) * dim)
    sizes = {}
    for arch in ("iunet", "unet"):
        opts.arch = arch
        model = build_model(opts)
        assert isinstance(model, ChannelLift) and model.residual
        torch.testing.assert_close(model(x), x)
        sizes[arch] = sum(p.numel() for p in model.parameters())
    assert abs(sizes["unet"] - sizes["iunet"]) / sizes["iunet"] < 0.3, sizes
    assert matched_unet_width((8, 16, 32), (1, 1, 1), dim) >= 1


def test_image_metrics():
    truth = foam_phantom(32, seed=0)
    assert image_metrics(truth * 0.5 + 0.25, truth)["ssim"] < 1.0
    m = image_metrics(truth + 0.1, truth)
    assert m["psnr"] == pytest.approx(20.0, abs=1e-5)  # 10 log10(1 / 0.1**2), float32 input and 0.9 < m["ssim"] <= 1.0


def test_evaluate_reports_model_and_fbp():
    opts = parse_options(TASK, size=16, n_train=4, n_val=2, angles=8, channels=[4, 8], architecture=[1, 1])
    _, val = TASK.datasets(opts)
    loader = torch.utils.data.DataLoader(val, batch_size=2)
    metrics = TASK.evaluate(build_model(opts), loader)
    # the untrained model is the identity: its metrics are the FBP's
    assert metrics["psnr"] == pytest.approx(metrics["psnr_fbp"])
    assert metrics["ssim"] == pytest.approx(metrics["ssim_fbp"])


def test_add_arguments_is_a_parser_hook():
    parser = argparse.ArgumentParser()
    TASK.add_arguments(parser)
    assert parser.parse_args(["--arch", "unet"]).arch == "unet"


def test_committed_notebook_results():
    """notebooks/06 as committed (executed at its defaults): the iUNet beats FBP by >= 3 dB PSNR."""
    import json
    from pathlib import Path

    notebook = Path(__file__).resolve().parent.parent / "notebooks" / "06_ct_postprocessing.ipynb"
    cells = json.loads(notebook.read_text())["cells"]
    lines = [line for cell in cells for out in cell.get("outputs", []) if out.get("name") == "stdout"
             for line in "".join(out["text"]).splitlines() if line.startswith("RESULTS ")]
    assert len(lines) == 1, "the committed notebook has no RESULTS line: execute it at its defaults"
    results = json.loads(lines[0][len("RESULTS "):])
    assert results["smoke"] is False, "the committed notebook was executed with SMOKE=True"
    assert results["psnr_iunet"] >= results["psnr_fbp"] + 3.0, results
    assert results["psnr_unet"] > results["psnr_fbp"], results
    assert results["ssim_iunet"] > results["ssim_fbp"] and results["ssim_unet"] > results["ssim_fbp"], results
