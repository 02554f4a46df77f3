"""Tests of iunet_nb.notebook.helpers."""
import json
import math

import numpy as np
import pytest
import torch

from iunet_nb.notebook.helpers import (load_results, median_seconds, resolve_device, save_results,
                                     seed_everything, to_jsonable)


def test_seed_everything_is_reproducible():
    g1 = seed_everything(3)
    a = torch.rand(3), np.random.rand(), torch.rand(2, generator=g1)
    g2 = seed_everything(3)
    b = torch.rand(3), np.random.rand(), torch.rand(2, generator=g2)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2])


@pytest.mark.parametrize("bad", [1.5, "0", True])
def test_seed_everything_rejects_non_int(bad):
    with pytest.raises(TypeError):
        seed_everything(bad)


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            resolve_device("cuda")


def test_to_jsonable_converts_everything():
    obj = {1: torch.tensor([1.0, 2.0]), "a": (np.float32(0.5), np.arange(2)), "b": math.nan,
           "c": [torch.tensor(3), float("inf")], "d": torch.float64}
    out = to_jsonable(obj)
    assert out == {"1": [1.0, 2.0], "a": [0.5, [0, 1]], "b": None, "c": [3, None], "d": "torch.float64"}
    json.dumps(out, allow_nan=False)
    with pytest.raises(TypeError):
        to_jsonable(object())


def test_save_and_load_results(tmp_path):
    assert save_results(None, {"a": 1}) is None
    path = save_results(tmp_path / "sub" / "r.json", {"x": torch.tensor(0.25), "y": [1, 2]})
    assert path.exists()
    assert load_results(path) == {"x": 0.25, "y": [1, 2]}
    with pytest.raises(TypeError):
        save_results(tmp_path / "r.json", [1, 2])


def test_median_seconds():
    calls = []
    t = median_seconds(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and 0 <= t < 1
    with pytest.raises(ValueError):
        median_seconds(lambda: None, repeats=0)


def test_quiet_native_stderr_silences_fd2_and_restores_it(tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "import os\n"
        "from iunet_nb.notebook.helpers import quiet_native_stderr\n"
        "with quiet_native_stderr():\n"
        "    os.write(2, b'hidden\\n')\n"
        "os.write(2, b'visible\\n')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr == "visible\n"


def test_progress_outside_jupyter_is_a_plain_bar_and_can_be_disabled(capsys):
    from iunet_nb.notebook.helpers import in_jupyter_kernel, progress

    assert not in_jupyter_kernel()
    assert list(progress(range(3), desc="x", enable=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    assert list(progress(range(3), desc="steps")) == [0, 1, 2]
    assert "steps" in capsys.readouterr().err


def test_display_line_keeps_only_the_last_line(monkeypatch):
    import iunet_nb.notebook.helpers as nu

    shown = []

    class Handle:
        def update(self, data, raw):
            shown.append(data["text/plain"])

    monkeypatch.setattr("IPython.display.display", lambda *a, **k: Handle())
    line = nu._DisplayLine()
    line.write("\rsteps:  50%| 1/2")
    line.write("\rsteps: 100%| 2/2\n")
    line.write("\n")
    assert shown == ["steps:  50%| 1/2", "steps: 100%| 2/2"]


def test_memory_parts_add_up_to_the_total():
    from iunet_nb import iUNet
    from iunet_nb.measure.meter import measure_step
    from iunet_nb.notebook.helpers import MEMORY_DEFINITION, memory_parts

    model = iUNet(channels=(4, 8), architecture=(1, 1), dim=2, verbose=0)
    m = measure_step(model, torch.randn(1, 4, 16, 16))
    parts = memory_parts(m)
    assert sum(parts.values()) == m.total_bytes
    assert parts["parameters"] == 4 * sum(p.numel() for p in model.parameters())
    assert "parameters + input" in MEMORY_DEFINITION


def test_measurement_cells_newest_wins_and_keeps_the_spread():
    from iunet_nb.notebook.helpers import measurement_cells

    old = [dict(mode="fused", size=512, delta=5, status="ok", seconds=9.0, seconds_all="9.5 9.0", total_bytes=2),
           dict(mode="fused", size=512, delta=10, status="error", seconds=None, total_bytes=None)]
    new = [dict(mode="fused", size=512, delta=5, status="ok", seconds=8.9, seconds_all="8.9 9.2", total_bytes=1),
           dict(mode="fused", size=512, delta=30, status="ok", seconds=4.0, seconds_all="", total_bytes=3,
                optimizer="sgd")]
    cells = measurement_cells(old, new)
    assert list(cells) == [("fused", 512, 5)]
    assert cells[("fused", 512, 5)]["total_bytes"] == 1 and cells[("fused", 512, 5)]["times"] == [8.9, 9.2]
