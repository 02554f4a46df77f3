"""The training loop :mod:`iunet_nb.train` in one process: API, CLI, checkpoints, resume, errors."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iunet_nb.apps import get_task
from iunet_nb.train import load_checkpoint, main, parse_options, train

REPO = Path(__file__).resolve().parent.parent
# 2D 16x16 CT, 8 training phantoms, global batch 4: 2 steps per epoch
TINY = dict(size=16, n_train=8, n_val=2, angles=8, batch_size=4, channels=[4, 8], architecture=[1, 1],
            progress=False)
TINY_ARGV = ["--size", "16", "--n-train", "8", "--n-val", "2", "--angles", "8", "--batch-size", "4",
             "--channels", "4", "8", "--architecture", "1", "1"]


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.slow  # the first test of the file pays for importing scikit-image and building the data
def test_history_checkpoint_and_csv(tmp_path):
    run = train("ct", epochs=2, out=str(tmp_path), **TINY)
    assert [row["epoch"] for row in run.history] == [1, 2]
    assert [row["step"] for row in run.history] == [2, 4]
    assert {"train_loss", "psnr", "ssim", "psnr_fbp", "ssim_fbp", "seconds"} <= set(run.history[0])
    ckpt = _state(tmp_path / "checkpoint.pt")  # weights_only=True
    assert ckpt["epoch"] == 2 and ckpt["step"] == 4 and ckpt["task"] == "ct"
    for key, value in run.model.state_dict().items():
        assert torch.equal(ckpt["model"][key], value), key
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["psnr"]) == pytest.approx(run.history[1]["psnr"], rel=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.csv"]  # no temp files


def test_nothing_written_without_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = train("ct", epochs=1, **TINY)
    assert run.out is None and not list(tmp_path.iterdir())


def test_resume_continues_exactly(tmp_path):
    """1 epoch, then resume to 3 == 3 epochs at once: same weights, optimiser, metrics, RNG."""
    whole = train("ct", epochs=3, out=str(tmp_path / "whole"), **TINY)
    train("ct", epochs=1, out=str(tmp_path / "part"), **TINY)
    torch.manual_seed(12345)  # the resumed run must restore its own random state
    resumed = train("ct", epochs=3, out=str(tmp_path / "part"), resume="auto", **TINY)
    a, b = _state(tmp_path / "whole" / "checkpoint.pt"), _state(tmp_path / "part" / "checkpoint.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for key in a["rng"][0]:
        assert torch.equal(a["rng"][0][key], b["rng"][0][key]), key
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(whole.history) == strip(resumed.history)


def test_resume_auto_without_checkpoint_starts_afresh(tmp_path):
    run = train("ct", epochs=1, out=str(tmp_path), resume="auto", **TINY)
    assert len(run.history) == 1


def test_checkpoint_of_other_options_or_task_is_a_clear_error(tmp_path):
    train("ct", epochs=1, out=str(tmp_path), **TINY)
    with pytest.raises(ValueError, match=r"channels=\[4, 8\] there, \[6, 16\] here"):
        train("ct", epochs=2, out=str(tmp_path), resume="auto", **{**TINY, "channels": [6, 16]})
    with pytest.raises(ValueError, match="arch='iunet' there, 'unet' here"):
        train("ct", epochs=2, out=str(tmp_path), resume="auto", arch="unet", **TINY)
    ckpt = _state(tmp_path / "checkpoint.pt")
    ckpt["task"] = "flow"
    torch.save(ckpt, tmp_path / "flow.pt")
    with pytest.raises(ValueError, match="written by task 'flow', not 'ct'"):
        train("ct", epochs=2, resume=str(tmp_path / "flow.pt"), **TINY)
    ckpt["task"] = "ct"
    ckpt["model"] = {k + ".x": v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "other_model.pt")
    with pytest.raises(ValueError, match="holds another model than ChannelLift"):
        train("ct", epochs=2, resume=str(tmp_path / "other_model.pt"), **TINY)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a checkpoint written by iunet_nb.train"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train("ct", resume=str(tmp_path / "missing.pt"), **TINY)


@pytest.mark.parametrize("options, error, message", [
    (dict(batch_size=0), ValueError, "batch_size: must be a positive integer"),
    (dict(lr=-1.0), ValueError, "lr: must be a positive number"),
    (dict(engine="magic"), ValueError, "engine must be one of"),
    (dict(arch="resnet"), ValueError, "arch must be one of"),
    (dict(channels=4), TypeError, "channels takes a list"),
    (dict(progress=1), TypeError, "progress must be True or False"),
    (dict(bath_size=4), TypeError, r"unknown option\(s\) \['bath_size'\]"),
])
def test_bad_options_are_clear_errors(options, error, message):
    with pytest.raises(error, match=message):
        parse_options(get_task("ct"), **options)


def test_bad_values_found_by_the_loop():
    with pytest.raises(ValueError, match="exceeds the 8 training samples"):
        train("ct", epochs=1, **{**TINY, "batch_size": 16})
    with pytest.raises(ValueError, match="divisible by 2\\*\\*\\(levels-1\\) = 4"):
        train("ct", epochs=1, **{**TINY, "size": 18, "channels": [4, 8, 16], "architecture": [1, 1, 1]})
    with pytest.raises(ValueError, match="unknown task 'segmentation2d'"):
        train("segmentation2d")


def test_cli_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["ct", "--batch-size", "zero"])
    assert exit_.value.code == 2 and "--batch-size" in capsys.readouterr().err
    assert main(["nope"]) == 2 and "unknown task 'nope'" in capsys.readouterr().err
    assert main([]) == 2
    assert main(["--help"]) == 0 and "TASK" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_ct(tmp_path):
    """``python -m iunet_nb.train ct`` with tiny options, as a user runs it."""
    cmd = [sys.executable, "-m", "iunet_nb.train", "ct", *TINY_ARGV, "--epochs", "2", "--out", str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch=2 step=4" in result.stdout
    assert len(list(csv.DictReader((tmp_path / "metrics.csv").open()))) == 2
    again = subprocess.run([*cmd, "--resume", "--epochs", "1"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 2 and "has already trained 2 epochs" in again.stderr
