"""The segmentation3d task: synthetic volumes, Dice, models, memory helpers, the training loop."""
from __future__ import annotations

import math

import pytest
import torch

from iunet_nb.apps import get_task
from iunet_nb.apps import segmentation as S


def test_make_volumes_shapes_ranges_and_determinism():
    x, y = S.make_volumes(3, size=16, num_classes=3, noise=0.5, num_objs=4, seed=7)
    assert x.shape == (3, 1, 16, 16, 16) and x.dtype == torch.float32
    assert y.shape == (3, 16, 16, 16) and y.dtype == torch.int64
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    assert set(y.unique().tolist()) <= {0, 1, 2, 3} and int(y.max()) >= 1
    x2, y2 = S.make_volumes(3, size=16, num_classes=3, noise=0.5, num_objs=4, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = S.make_volumes(3, size=16, num_classes=3, noise=0.5, num_objs=4, seed=8)
    assert not torch.equal(x, x3)


@pytest.mark.parametrize("kwargs, word", [
    (dict(n=0), "n"), (dict(size=4), "size"), (dict(noise=-1.0), "noise"),
    (dict(rad_min=8, rad_max=6), "rad_min"), (dict(num_classes=2.5), "num_classes"),
])
def test_make_volumes_rejects_bad_arguments(kwargs, word):
    args = dict(n=1, size=16, num_objs=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        S.make_volumes(**args)


def test_dice_hand_computed_case():
    # one volume of 8 voxels, classes 1 and 2
    target = torch.tensor([[0, 1, 1, 1, 2, 2, 0, 0]])
    pred = torch.tensor([[1, 1, 1, 0, 2, 0, 0, 2]])
    d = S.dice_per_class(pred, target, num_classes=3)
    # class 1: |P|=3, |G|=3, |P∩G|=2 -> 4/6; class 2: |P|=2, |G|=2, |P∩G|=1 -> 2/4; class 3 absent -> nan
    assert d[0, 0].item() == pytest.approx(4 / 6)
    assert d[0, 1].item() == pytest.approx(0.5)
    assert math.isnan(d[0, 2].item())


def test_dice_matches_monai():
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (3, 6, 6, 6), generator=g)
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.7, target,
                       torch.randint(0, 4, target.shape, generator=g))
    ours = S.dice_per_class(pred, target, 3)
    metric = DiceMetric(include_background=False, reduction="none")
    theirs = metric(one_hot(pred.unsqueeze(1), 4), one_hot(target.unsqueeze(1), 4))
    assert torch.allclose(ours, theirs.double(), atol=1e-6)


def test_dice_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        S.dice_per_class(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long), 2)


def test_voxelwise_classifier_is_perfect_without_noise_and_fails_with_it():
    x, y = S.make_volumes(4, size=16, num_classes=3, noise=0.0, num_objs=4, seed=1)
    table = S.fit_voxelwise_classifier(x, y, 3)
    assert torch.equal(S.apply_voxelwise_classifier(x, table), y)
    xn, yn = S.make_volumes(4, size=16, num_classes=3, noise=0.6, num_objs=4, seed=1)
    table = S.fit_voxelwise_classifier(xn, yn, 3)
    d = S.dice_per_class(S.apply_voxelwise_classifier(xn, table), yn, 3).nanmean(0)
    assert d[0] < 0.5  # class 1 drowns in the background noise voxel by voxel
    assert d[2] > 0.99  # the brightest class stays separable


def test_iunet_model_starts_as_identity_body_and_maps_shapes():
    torch.manual_seed(0)
    net = S.build_model("iunet", (8, 16, 32), (1, 1, 1), depth=1, num_classes=3)
    x = torch.randn(2, 8, 8, 8, 8)
    assert torch.allclose(net.body(x), x, atol=1e-5)
    out = net(torch.rand(2, 1, 8, 8, 8))
    assert out.shape == (2, 4, 8, 8, 8)


def test_unet_baseline_has_same_levels_and_comparable_size():
    iu = S.build_model("iunet")
    un = S.build_model("unet")
    assert un.body.channels == list(iu.body.channels)
    n_iu = sum(p.numel() for p in iu.parameters())
    n_un = sum(p.numel() for p in un.parameters())
    assert 0.5 < n_iu / n_un < 2
    with pytest.raises(ValueError, match="kind"):
        S.build_model("vnet")


def test_fit_volume_memory_recovers_a_cubic_law():
    a, b = S.fit_volume_memory([8, 16, 24], [100 + 3 * s ** 3 for s in (8, 16, 24)])
    assert a == pytest.approx(100) and b == pytest.approx(3)
    with pytest.raises(ValueError, match="distinct"):
        S.fit_volume_memory([8, 8], [1, 2])


@pytest.mark.slow
def test_largest_volume_is_verified_by_a_measured_step():
    torch.manual_seed(0)
    net = S.build_model("iunet", (8, 16, 32), (1, 1, 1), depth=1, num_classes=3)
    small = S.measure_volume_step(net, 8, 3).total_bytes
    big = S.measure_volume_step(net, 16, 3).total_bytes
    assert big > small > 0
    res = S.largest_volume(net, budget_bytes=(small + big) / 2, num_classes=3, fit_sizes=(8, 12))
    assert res["checks"], "at least one verifying measurement"
    if res["size"]:
        assert res["measured_bytes"] <= (small + big) / 2
        assert 8 <= res["size"] < 16
    with pytest.raises(ValueError, match="budget"):
        S.largest_volume(net, 0, 3)


def test_task_trains_through_the_loop_and_reports_dice():
    from iunet_nb.train import train

    task = get_task("segmentation3d")
    assert task is S.TASK
    run = train("segmentation3d", epochs=1, batch_size=2, lr=5e-3, progress=False, n_train=2, n_val=1,
                size=16, channels=[8, 16], architecture=[1, 1], depth=1)
    row = run.history[-1]
    assert {"loss", "dice", "dice_1", "dice_2", "dice_3", "train_loss"} <= set(row)
    assert math.isfinite(row["train_loss"])


def test_task_rejects_mismatched_levels():
    from iunet_nb.train import train

    with pytest.raises(ValueError, match="architecture"):
        train("segmentation3d", epochs=1, batch_size=1, progress=False, n_train=1, n_val=1, size=16,
              channels=[8, 16], architecture=[1, 1, 1])
