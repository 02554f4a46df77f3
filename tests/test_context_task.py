"""The context task (class = shape, not intensity), its options, and whole-volume inference."""
from __future__ import annotations

import pytest
import torch

from iunet_nb.apps import segmentation as S
from iunet_nb.apps import whole_volume as W

PATCH = (16, 24, 32)  # training volumes (non-cubic)
BIG = (24, 40, 48)  # held-out volumes, larger than the patch in every dimension
CTX = dict(channels=2, num_classes=3, num_objs=8)


def _mean_dice(pred, y, k=3):
    return float(torch.nanmean(S.dice_per_class(pred, y, k), 0).nanmean())


# ----------------------------------------------------------------------------- generator
def test_context_volumes_shapes_ranges_determinism():
    x, y = S.make_context_volumes(3, shape=(12, 20, 28), channels=3, seed=5)
    assert x.shape == (3, 3, 12, 20, 28) and x.dtype == torch.float32
    assert y.shape == (3, 12, 20, 28) and y.dtype == torch.int64
    assert 0 <= float(x.min()) < 0.1 and 0.9 < float(x.max()) <= 1
    assert set(y.unique().tolist()) == {0, 1, 2, 3}
    x2, y2 = S.make_context_volumes(3, shape=(12, 20, 28), channels=3, seed=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, S.make_context_volumes(3, shape=(12, 20, 28), channels=3, seed=6)[0])


def test_context_classes_are_shapes_of_equal_intensity():
    from skimage.measure import label, regionprops

    x, y = S.make_context_volumes(4, shape=PATCH, seed=0, **CTX)
    # every connected object is one class, and its shape is the class's: balls are round and
    # thick, rods long in one direction, plates thin in one direction
    for vol in y:
        for region in regionprops(label(vol.numpy() > 0)):
            classes = vol.numpy()[tuple(region.coords.T)]
            assert len(set(classes.tolist())) == 1
            ext = sorted(b - a for a, b in zip(region.bbox[:3], region.bbox[3:]))
            kind = S.CONTEXT_SHAPES[int(classes[0]) - 1]
            if kind == "ball":
                assert ext[0] == ext[2] >= 7
            elif kind == "rod":
                assert ext[1] <= 3 and ext[2] >= 10
            else:
                assert ext[0] <= 3 and ext[1] >= 7
    # without texture and noise every object voxel has one value per channel, whatever its class
    x0, y0 = S.make_context_volumes(2, shape=PATCH, seed=0, texture=0.0, noise=0.0, **CTX)
    for c in range(2):
        assert x0[:, c][y0 > 0].unique().numel() == 1 and x0[:, c][y0 == 0].unique().numel() == 1
    # with them, the classes' mean intensities differ by sampling only, far less than object vs background
    x, y = S.make_context_volumes(8, shape=PATCH, seed=0, **CTX)
    for c in range(2):
        means = [float(x[:, c][y == k].mean()) for k in (1, 2, 3)]
        contrast = abs(float(x[:, c][y > 0].mean()) - float(x[:, c][y == 0].mean()))
        assert max(means) - min(means) < 0.4 * contrast, (means, contrast)


@pytest.mark.parametrize("kwargs, word", [
    (dict(shape=(8, 16, 16)), "shape"), (dict(shape=(16, 16)), "shape"), (dict(channels=0), "channels"),
    (dict(num_classes=4), "num_classes"), (dict(noise=-0.1), "noise"), (dict(texture="a"), "texture"),
])
def test_context_volumes_reject_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        S.make_context_volumes(1, **kwargs)


def test_make_volumes_takes_a_non_cubic_shape():
    x, y = S.make_volumes(2, shape=(16, 24, 32), num_objs=4, seed=3)
    assert x.shape == (2, 1, 16, 24, 32) and y.shape == (2, 16, 24, 32) and int(y.max()) >= 1
    with pytest.raises(ValueError, match="shape"):
        S.make_volumes(1, shape=(16, 4, 16))


def test_voxelwise_rule_on_several_channels():
    x, y = S.make_context_volumes(2, shape=PATCH, seed=0, **CTX)
    table = S.fit_voxelwise_classifier(x, y, 3)
    assert table.shape == (100, 100)
    assert S.apply_voxelwise_classifier(x, table).shape == y.shape
    assert S.fit_voxelwise_classifier(torch.cat([x, x[:, :1]], 1), y, 3).shape == (27, 27, 27)
    with pytest.raises(ValueError, match="channel"):
        S.apply_voxelwise_classifier(x[:, :1], table)
    # one channel: the same table as before the extension (bins of channel 0)
    x1, y1 = S.make_volumes(2, size=16, num_objs=4, seed=1)
    t1 = S.fit_voxelwise_classifier(x1, y1, 3)
    assert t1.shape == (100,)
    assert torch.equal(S.apply_voxelwise_classifier(x1, t1), t1[(x1[:, 0] * 99).round().long()])


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained():
    """A small 3D iUNet trained for 25 epochs on 16 patches of the context task (about 15 s)."""
    from iunet_nb.train import train

    torch.manual_seed(0)
    run = train("segmentation3d", data="context", in_channels=2, shape=list(PATCH), classes=3, objects=8,
                n_train=16, n_val=8, epochs=25, batch_size=2, lr=1e-2, progress=False,
                channels=[8, 16, 32], architecture=[1, 1, 1], depth=1)
    return run.model.cpu().eval()


def test_iunet_beats_the_voxelwise_rule_by_a_clear_margin(trained):
    opts_kw = dict(shape=PATCH, **CTX)
    x, y = S.make_context_volumes(16, seed=0, **opts_kw)  # the loop's training set (seed 2 * 0)
    xv, yv = S.make_context_volumes(8, seed=1, **opts_kw)  # its held-out set
    rule = _mean_dice(S.apply_voxelwise_classifier(xv, S.fit_voxelwise_classifier(x, y, 3)), yv)
    net = _mean_dice(S.predict_labels(trained, xv), yv)
    # measured: rule 0.17, iUNet 0.51 (margin 0.34)
    assert rule < 0.25
    assert net > rule + 0.2, (rule, net)


def test_task_options_reach_data_and_model():
    from iunet_nb.train import parse_options

    opts = parse_options(S.TASK, data="context", in_channels=3, shape=[12, 16, 20], n_train=1, n_val=1)
    train, _ = S.datasets(opts)
    assert train.tensors[0].shape == (1, 3, 12, 16, 20)
    assert S.model(opts).lift.in_channels == 3
    default = parse_options(S.TASK)
    assert (default.data, default.in_channels, default.shape, default.size) == ("spheres", 1, None, 32)
    with pytest.raises(ValueError, match="--in-channels"):
        S.datasets(parse_options(S.TASK, in_channels=2, n_train=1, n_val=1, size=16))
    with pytest.raises(ValueError, match="--classes"):
        S.datasets(parse_options(S.TASK, data="context", classes=4, n_train=1, n_val=1, size=16))


# ----------------------------------------------------------------------------- whole volumes
class _KnownAllocations(torch.nn.Module):
    """A forward that holds a 1 MiB temporary next to its output (known bytes)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        tmp = torch.ones(2 ** 18)  # 1 MiB of float32
        out = x * self.w  # same bytes as x
        return out + tmp[:1]  # one more output-sized tensor while tmp and out are alive


def test_measure_forward_counts_known_allocations_and_keeps_no_graph():
    from iunet_nb.measure.meter import measure_forward

    x = torch.rand(2 ** 16)  # 256 KiB
    out, m = measure_forward(_KnownAllocations(), x)
    assert m.meter == "cpu-profiler" and not out.requires_grad
    assert m.peak_bytes == 2 ** 20 + 2 * x.nbytes
    assert m.output_bytes == x.nbytes and m.input_bytes == x.nbytes
    assert m.total_bytes == m.param_bytes + m.input_bytes + m.peak_bytes
    # a convolution's output at least, growing with the volume
    net = torch.nn.Conv3d(2, 8, 3, padding=1)
    peaks = [measure_forward(net, torch.rand(1, 2, s, s, s))[1].peak_bytes for s in (16, 32)]
    assert peaks[0] >= 8 * 16 ** 3 * 4 and 6 < peaks[1] / peaks[0] < 10


def test_sliding_window_on_one_window_equals_a_direct_forward(trained):
    x, y = S.make_context_volumes(2, shape=PATCH, seed=1, **CTX)
    with torch.no_grad():
        direct = torch.cat([trained(x[i:i + 1]) for i in range(2)])  # MONAI runs one window at a time
    sw = W.sliding_window_logits(trained, x, roi_size=PATCH, mode="constant")
    assert sw.shape == direct.shape == (2, 4, *PATCH)
    assert torch.allclose(sw, direct, atol=1e-5), float((sw - direct).abs().max())
    assert _mean_dice(sw.argmax(1), y) == _mean_dice(direct.argmax(1), y)


def test_roi_size_must_fit_the_downsampling():
    net = S.build_model("iunet", (8, 16, 32), (1, 1, 1), depth=1, in_channels=2)
    assert W.downsampling_factors(net) == (4, 4, 4)
    with pytest.raises(ValueError, match=r"roi_size.*\(16, 24, 32\)"):
        W.sliding_window_logits(net, torch.rand(1, 2, 16, 24, 32), roi_size=(15, 22, 32))
    with pytest.raises(ValueError, match="overlap"):
        W.sliding_window_logits(net, torch.rand(1, 2, 16, 24, 32), roi_size=PATCH, overlap=1.0)


def test_whole_volume_and_sliding_window_on_larger_volumes(trained):
    # the patches' object density: 8 objects in 16 x 24 x 32 -> about 30 in 24 x 40 x 48
    x, y = S.make_context_volumes(4, shape=BIG, seed=7, channels=2, num_classes=3, num_objs=30)
    res = W.compare_whole_volume(trained, x, y, roi_size=PATCH, overlap=0.25)
    assert res["sliding"].shape == res["whole"].shape == y.shape
    assert res["windows_per_volume"] == 8
    # both ways segment the larger volumes well above the voxel-wise rule (0.17 on patches)
    assert res["dice_sliding"] > 0.35 and res["dice_whole"] > 0.35, res
    assert abs(res["dice_sliding"] - res["dice_whole"]) < 0.1, res
    # interior voxels (away from the volume's border): the two ways agree on most labels
    m = 4
    inner = (slice(None), slice(m, -m), slice(m, -m), slice(m, -m))
    agree = float((res["sliding"][inner] == res["whole"][inner]).double().mean())
    assert agree > 0.93, agree
    # memory: one window's forward plus MONAI's buffers stays below the whole volume's forward
    ms, mw = res["memory_sliding"], res["memory_whole"]
    assert ms.meter == mw.meter == "cpu-profiler"
    assert mw.peak_bytes > ms.peak_bytes > 0
    assert res["predicted_inference_bytes"] is None
    assert res["predicted"]["total_bytes"] > 0 and "no inference estimate" in res["predicted"]["note"]


def test_window_count_matches_monai():
    from monai.inferers import sliding_window_inference

    calls = []

    def predictor(w):
        calls.append(w.shape[0])
        return w

    sliding_window_inference(torch.rand(1, 1, *BIG), PATCH, 1, predictor, overlap=0.25)
    assert W._window_count(BIG, PATCH, 0.25) == len(calls)
