"""``python -m iunet_nb.bench volume3d``: the bracketing search, the model and the CLI checks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from iunet_nb.measure import bench3d

REPO = Path(__file__).resolve().parent.parent


def _synthetic(fixed: int, per_voxel: float, calls: list):
    def measure(d: int) -> dict:
        calls.append(d)
        return dict(status="ok", total_bytes=int(fixed + per_voxel * d**3), param_bytes=fixed // 3)
    return measure


@pytest.mark.parametrize("guess", [8, 40, 64, 200])
def test_bracketing_finds_the_largest_multiple_of_8(guess):
    budget = 100 * 2**20
    fixed, per_voxel = 5 * 2**20, 300.0
    want = max(d for d in range(8, 1000, 8) if fixed + per_voxel * d**3 <= budget)
    calls: list = []
    res = bench3d.largest_volume("x", budget, _synthetic(fixed, per_voxel, calls), guess)
    assert res["status"] == "ok"
    assert res["D"] == want and res["next"] == want + 8
    assert want in calls and want + 8 in calls  # both ends of the bracket were measured
    assert len(calls) <= 6


def test_nothing_fits_and_errors_are_reported():
    res = bench3d.largest_volume("x", 10, _synthetic(100, 1.0, []), 64)
    assert res["D"] == 0 and res["next"] == 8 and res["status"] == "ok"
    res = bench3d.largest_volume("x", 10**9, lambda d: dict(status="error", message="boom"), 64)
    assert res["status"] == "error" and "D=64: boom" in res["message"]


@pytest.mark.slow
def test_volume_model_shapes_and_a_measured_step():
    for mode in ("unet", "fused"):
        net = bench3d.build_volume_model(mode)
        x = torch.randn(1, 1, 16, 16, 16)
        assert net(x).shape == x.shape
    row = bench3d.measure_volume("fused_sgd_in_backward", 16, budget_bytes=2**30)
    assert row["status"] == "ok" and row["grad_bytes"] == 0 and row["seconds"] > 0
    assert row["total_bytes"] == row["param_bytes"] + 16**3 * 4 + row["peak_bytes"]
    assert bench3d.predicted_volume_total("fused", 64) < bench3d.predicted_volume_total("unet", 64)
    # Here the body's output feeds the output convolution and only that convolution's output is
    # kept, so the default mode takes the body's output too (ownership note 12): both modes
    # measure the same, below 3 input tensors (3.1 for consuming before notes 11 and 12).
    consuming = bench3d.measure_volume("fused_consuming", 48, time_it=False)
    fused = bench3d.measure_volume("fused", 48, time_it=False)
    assert bench3d.build_volume_model("fused_consuming").body.consume_output
    assert abs(fused["overhead_tensors"] - consuming["overhead_tensors"]) < 0.05, (fused, consuming)
    assert fused["overhead_tensors"] < 3.0, fused
    assert bench3d.predicted_volume_total("fused_consuming", 64) == bench3d.predicted_volume_total("fused", 64)


@pytest.mark.slow
def test_consuming_mode_trains_the_volume_model_below_two_and_a_half_input_tensors():
    """At 64^3 the finest level's couplings reach SLAB_MIN_BYTES: the consuming mode computes
    them slab by slab in the forward too, and the resamplings work in the memory of their
    input (measured at 112^3: 2.60 T for both modes before, 2.26 T consuming now; 2.37 /
    2.50 T here)."""
    consuming = bench3d.measure_volume("fused_consuming", 64, time_it=False)
    fused = bench3d.measure_volume("fused", 64, time_it=False)
    assert consuming["overhead_tensors"] <= 2.45, consuming
    assert consuming["overhead_tensors"] < fused["overhead_tensors"] - 0.08, (consuming, fused)
    assert fused["overhead_tensors"] <= 2.6, fused


def test_report_and_ratios():
    rows = [dict(mode="iunets", D=32, voxels=32**3, status="ok", total_bytes=2**20, peak_bytes=2**19,
                 overhead_tensors=8.0, seconds=1.0, next_total_bytes=3 * 2**20, predicted_D=40),
            dict(mode="fused", D=48, voxels=48**3, status="ok", total_bytes=2**20, peak_bytes=2**19,
                 overhead_tensors=4.0, seconds=1.5, next_total_bytes=3 * 2**20, predicted_D=48)]
    bench3d._add_ratios(rows)
    assert rows[1]["voxel_ratio_to_iunets"] == pytest.approx((48 / 32) ** 3)
    text = bench3d.format_volume_report(rows, 0.25, ["a note"])
    assert "[PASS] fused >= 2.5x the voxels of iunets 0.1: 3.38x" in text and "note: a note" in text


@pytest.mark.parametrize("args, match", [
    (("--budget-gib", "0"), "--budget-gib must be a positive number"),
    (("--budget-gib", "nan"), "--budget-gib must be a positive number"),
    (("--threads", "0"), "--threads must be an integer >= 1"),
])
def test_cli_rejects_bad_arguments_before_any_work(tmp_path, capsys, args, match):
    from iunet_nb.measure import bench

    out = tmp_path / "res"
    with pytest.raises(SystemExit) as exc:
        bench.main(["volume3d", "--out", str(out), *args])
    assert exc.value.code == 2 and match in capsys.readouterr().err
    assert not out.exists()
    target = tmp_path / "file.csv"
    target.write_text("x")
    with pytest.raises(SystemExit):
        bench.main(["volume3d", "--out", str(target)])
    assert "is an existing file" in capsys.readouterr().err and target.read_text() == "x"


def _capture_saved_figures(monkeypatch) -> list:
    """The figures saved while the test runs (plot_volume3d returns only the path)."""
    from matplotlib.figure import Figure

    saved, original = [], Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def test_plot_volume3d_draws_every_mode_distinctly(tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    saved = _capture_saved_figures(monkeypatch)
    rows, points = [], []
    for k, mode in enumerate(bench3d.MODES):
        D = 64 + 8 * k
        rows.append(dict(mode=mode, D=D, voxels=D**3, status="ok"))
        points += [dict(mode=mode, D=D, total_bytes=(300 + 10 * k) * 2**20, status="ok"),
                   dict(mode=mode, D=D + 8, total_bytes=(600 + 10 * k) * 2**20, status="ok")]
    bench3d._add_ratios(rows)
    path = bench3d.plot_volume3d(rows, points, tmp_path / "volume3d.png", 0.5)
    assert path.stat().st_size > 10_000
    fig = saved[-1]
    bars, steps = fig.axes
    assert [t.get_text() for t in steps.get_legend().get_texts()] == [*bench3d.MODES, "budget 0.5 GiB"]
    styles = {ln.get_label(): (ln.get_marker(), ln.get_linestyle()) for ln in steps.get_lines()
              if ln.get_label() in bench3d.MODES}
    assert len(styles) == len(set(styles.values())) == len(bench3d.MODES)
    assert "MiB" in steps.get_ylabel() and "voxels" in bars.get_ylabel()
    # neither the labels above the bars nor the mode names below them collide sideways
    renderer = FigureCanvasAgg(fig).get_renderer()
    for texts in (bars.texts, bars.get_xticklabels()):
        boxes = [t.get_window_extent(renderer) for t in texts]
        assert len(boxes) == len(bench3d.MODES)
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))
    assert bars.texts[bench3d.MODES.index("iunets")].get_text().endswith("1.00×")


def test_latest_volume_csv_picks_the_newest_stamp(tmp_path):
    import os

    assert bench3d.latest_volume_csv(tmp_path / "missing") is None
    assert bench3d.latest_volume_csv(tmp_path) is None
    names = ["volume3d-20261130-090000.csv", "volume3d-20261129-162018.csv",
             "volume3d-20261201-000000-points.csv", "volume3d-20261130-090000-points.csv",
             "volume3d-20261202-000000.png", "volume3d-latest.csv", "table1-20261231-000000.csv"]
    for k, name in enumerate(names):  # the newest stamp gets the oldest modification time
        (tmp_path / name).write_text("run\n")
        os.utime(tmp_path / name, (1e9 + k, 1e9 + k))
    assert bench3d.latest_volume_csv(tmp_path) == tmp_path / "volume3d-20261130-090000.csv"
    assert bench3d.latest_volume_csv(str(tmp_path)) == tmp_path / "volume3d-20261130-090000.csv"
