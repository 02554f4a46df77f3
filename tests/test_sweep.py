"""Quality against training memory (:mod:`iunet_nb.apps.sweep`): planner, rows, fronts, budgets, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from iunet_nb.apps import sweep as S
from iunet_nb.apps.robust import Spread
from iunet_nb.arch.baselines import UNet
from iunet_nb.nn.conv import TiledConv


def _row(network, width, peak, mean, std, metric="dice"):
    return {"network": network, "config": {"width": width}, "peak_mib": peak, "metric": metric,
            "mean": mean, "std": std}


# ---------------------------------------------------------------------------------------------- planner
@pytest.fixture(scope="module")
def ct_plan():
    torch.set_num_threads(1)
    return S.plan_sweep("ct", 3, reduced=True)


def _check_plan(plan, sizes=3):
    by = {n: [p for p in plan if p.network == n] for n in S.NETWORKS}
    for network, mine in by.items():
        assert len(mine) == sizes, network
        widths = [p.config["width"] for p in mine]
        assert len(set(widths)) == sizes and widths == sorted(widths), (network, widths)
        peaks = [p.measured_peak_mib for p in mine]
        assert peaks == sorted(peaks), (network, peaks)  # wider is more memory
        assert all(p.measured_total_mib > p.measured_peak_mib > 0 for p in mine)
    lo = max(min(p.measured_peak_mib for p in by[n]) for n in S.NETWORKS)
    hi = min(max(p.measured_peak_mib for p in by[n]) for n in S.NETWORKS)
    assert lo < hi, "the measured ranges of the two networks do not overlap"
    span = {n: max(p.measured_peak_mib for p in by[n]) / min(p.measured_peak_mib for p in by[n])
            for n in S.NETWORKS}
    assert span["unet"] > 2 and span["iunet"] > 2, span  # a real range, not three equal points
    for p in by["iunet"]:  # each iUNet configuration measured close to the U-Net peak it was chosen for
        assert abs(math.log(p.measured_peak_mib / p.target_mib)) < math.log(1.35), p
        assert p.predicted_peak_mib is not None and p.predicted_peak_mib > 0
    for p in by["unet"]:  # the U-Net keeps whichever convolutions measured less
        assert p.measured_peak_mib <= p.other_peak_mib


def test_plan_ct_spans_the_same_measured_range(ct_plan):
    _check_plan(ct_plan)
    assert all("unet_width" in p.config for p in ct_plan if p.network == "unet")


def test_plan_segmentation_spans_the_same_measured_range():
    _check_plan(S.plan_sweep("segmentation3d", 3, reduced=True))


def test_plan_measures_what_it_reports(ct_plan):
    """A planned configuration re-measured gives its reported peak (the planner measured, not guessed)."""
    p = next(p for p in ct_plan if p.network == "iunet")
    m, _ = S.measure_config("ct", p.network, p.config, S.SPECS["ct"].reduced)
    assert m.peak_bytes / 2**20 == pytest.approx(p.measured_peak_mib, rel=0.02)


def test_tiled_unet_computes_the_same_function_and_gradients():
    torch.manual_seed(0)
    plain = UNet([4, 8], [1, 1], dim=3)
    tiled = S.with_tiled_convs(UNet([4, 8], [1, 1], dim=3))
    tiled.load_state_dict(plain.state_dict())
    assert sum(isinstance(m, TiledConv) for m in tiled.modules()) == 3  # the 3 residual blocks' convs
    assert not any(isinstance(m, TiledConv) for m in plain.modules())
    x = torch.randn(2, 4, 8, 8, 8)
    ya, yb = plain(x), tiled(x)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), tiled.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- rows
def test_run_sweep_rows_have_the_format(ct_plan):
    calls = []

    def fake(task, seeds, stop, **options):
        calls.append((task.name, seeds, options["arch"], options["channels"], options.get("unet_width")))
        w = options["channels"][0]
        return {"psnr": Spread.of([20 + w, 21 + w]), "ssim": Spread.of([0.5, 0.7]), "epoch": Spread.of([3, 3])}

    rows = S.run_sweep("ct", ct_plan, 2, trainer=fake, reduced=True)
    assert len(rows) == 2 * len(ct_plan) and len(calls) == len(ct_plan)
    for row in rows:
        assert tuple(row) == S.ROW_KEYS
        assert row["network"] in ("iunet", "unet") and row["metric"] in ("psnr", "ssim")
        assert isinstance(row["peak_mib"], float) and isinstance(row["config"], dict)
        json.dumps(row)
    first = rows[0]
    assert first["mean"] == pytest.approx(20.5 + first["config"]["width"])
    assert rows[1]["std"] == pytest.approx(Spread.of([0.5, 0.7]).std)
    assert {c[2] for c in calls} == {"iunet", "unet"}
    assert all(c[4] == c[3][0] for c in calls if c[2] == "unet")  # the ct U-Net gets its width


# ---------------------------------------------------------------------------------------------- fronts, budgets
ROWS = [
    _row("iunet", 8, 2.0, 0.50, 0.01), _row("iunet", 16, 4.0, 0.70, 0.01), _row("iunet", 32, 8.0, 0.65, 0.02),
    _row("unet", 4, 3.0, 0.40, 0.01), _row("unet", 8, 6.0, 0.72, 0.10), _row("unet", 16, 12.0, 0.90, 0.01),
]


def test_pareto_front_drops_dominated_configurations():
    fronts = S.pareto_front(ROWS)
    assert [r["config"]["width"] for r in fronts["iunet"]] == [8, 16]  # 32 costs more for less
    assert [r["config"]["width"] for r in fronts["unet"]] == [4, 8, 16]
    assert [r["config"]["width"] for r in S.pareto_front(ROWS, mode="min")["iunet"]] == [8]


def test_ahead_at_budgets_uses_the_spread():
    ahead = {a["budget_mib"]: a for a in S.ahead_at_budgets(ROWS)}
    assert sorted(ahead) == [2.0, 3.0, 4.0, 6.0, 12.0]
    assert ahead[2.0]["ahead"] == "iunet" and ahead[2.0]["unet"] is None  # only the iUNet fits
    assert ahead[3.0]["ahead"] == "iunet"  # 0.50 ± 0.01 against 0.40 ± 0.01
    assert ahead[4.0]["difference"] == pytest.approx(0.30)
    # 0.70 ± 0.01 against 0.72 ± 0.10: the difference is within the spread, neither is ahead
    assert ahead[6.0]["ahead"] is None and "within the spread" in ahead[6.0]["message"]
    assert ahead[12.0]["ahead"] == "unet" and ahead[12.0]["iunet"]["config"]["width"] == 16
    below = S.ahead_at_budgets(ROWS, budgets=[1.0])[0]
    assert below["ahead"] is None and below["message"] == "nothing fits"


def test_plot_has_labelled_axes_and_fronts(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    ax = S.plot_sweep(ROWS)
    assert ax.get_xlabel() == "measured training-step peak (MiB)" and ax.get_xscale() == "log"
    assert "Dice" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "iUNet Pareto front" in labels and "U-Net Pareto front" in labels
    ax.figure.savefig(tmp_path / "f.png")


# ---------------------------------------------------------------------------------------------- errors
def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="task must be one of"):
        S.plan_sweep("flow")
    with pytest.raises(ValueError, match="sizes must be an int >= 2"):
        S.plan_sweep("ct", 1, reduced=True)
    with pytest.raises(ValueError, match="unet_widths must have sizes=3"):
        S.plan_sweep("ct", 3, reduced=True, unet_widths=[2, 4])
    with pytest.raises(ValueError, match="iunet_widths must"):
        S.plan_sweep("ct", 3, reduced=True, iunet_widths=[0, 4, 8])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]"):
        S.plan_sweep("ct", 3, reduced=True, base={"colour": 1})
    with pytest.raises(TypeError, match="trainer must be a callable"):
        S.run_sweep("ct", [], 2, trainer=None)
    with pytest.raises(ValueError, match="configs is empty"):
        S.run_sweep("ct", [], 2, trainer=lambda *a, **k: {})
    with pytest.raises(ValueError, match="seeds must give at least 2"):
        S.run_sweep("ct", [], 1, trainer=lambda *a, **k: {})
    with pytest.raises(ValueError, match=r"configs\[0\] lacks \['measured_peak_mib'\]"):
        S.run_sweep("ct", [{"network": "iunet", "config": {}}], 2, trainer=lambda *a, **k: {})
    with pytest.raises(ValueError, match="pick one with metric="):
        S.pareto_front(ROWS + [_row("unet", 4, 3.0, 20.0, 1.0, metric="psnr")])
    with pytest.raises(ValueError, match=r"rows\[0\] lacks \['std'\]"):
        S.pareto_front([{k: v for k, v in ROWS[0].items() if k != "std"}])
    with pytest.raises(ValueError, match="budgets must be positive"):
        S.ahead_at_budgets(ROWS, budgets=[-1])


def test_cli_bad_arguments(capsys):
    from iunet_nb.train import main

    assert main(["sweep", "ct", "--seeds", "1"]) == 2
    assert "--seeds must be >= 2, got 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "flow"])
    assert "invalid choice: 'flow'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- CLI
# about 5 s at one thread: plan and 12 one-epoch trainings of the reduced ct sweep
def test_cli_tiny_sweep_writes_json_csv_and_figures(tmp_path, capsys):
    from iunet_nb.train import main

    out = tmp_path / "sweep"
    assert main(["sweep", "ct", "--reduced", "--seeds", "2", "--max-epochs", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sweep-psnr.png", "sweep-ssim.png", "sweep.csv",
                                                   "sweep.json"]  # no temporary files left
    result = json.loads((out / "sweep.json").read_text())
    rows = result["sweep"]
    assert len(rows) == 12 and all(tuple(r) == S.ROW_KEYS for r in rows)
    assert {(r["network"], r["metric"]) for r in rows} == {(n, m) for n in S.NETWORKS for m in ("psnr", "ssim")}
    assert all(r["std"] >= 0 and 5 < r["mean"] < 60 for r in rows if r["metric"] == "psnr")
    peaks = {p["network"] + str(p["config"]["width"]): p["measured_peak_mib"] for p in result["plan"]}
    assert all(peaks[r["network"] + str(r["config"]["width"])] == r["peak_mib"] for r in rows)
    assert set(result["ahead"]) == {"psnr", "ssim"}
    lines = (out / "sweep.csv").read_text().splitlines()
    assert lines[0] == "network,width,config,peak_mib,metric,mean,std" and len(lines) == 13
    assert (out / "sweep-psnr.png").read_bytes()[:4] == b"\x89PNG"
    assert "ahead" in capsys.readouterr().out
