"""Checks of notebooks/00_quickstart.ipynb (smoke run)."""

# First line of the printed layout in the reference README (seed 000).
SEED_FIRST_LINE = "64-64-(32/32)--------------------------------------------------------(32/32)-64-64"


def check(results: dict) -> None:
    assert results["roundtrip_error_2d"] < 1e-5, results["roundtrip_error_2d"]
    assert results["roundtrip_error_3d"] < 1e-5, results["roundtrip_error_3d"]
    layout = results["layout_text_2d"].splitlines()
    assert layout[0] == SEED_FIRST_LINE, layout[0]
    assert len(layout) == 4
    assert results["channels_3d"] == [7, 16, 32, 92]
    assert results["loss_last"] < results["loss_first"], (results["loss_first"], results["loss_last"])
    history = results["loss_history"]
    k = max(1, len(history) // 5)
    assert sum(history[-k:]) / k < 0.95 * sum(history[:k]) / k, "training did not lower the loss by 5 %"
    mem = results["memory_bytes"]
    assert set(mem) == {"conventional", "fused", "memcnn"}
    assert all(v > 0 for v in mem.values()), mem
    assert mem["fused"] < mem["conventional"], mem
    assert mem["memcnn"] < mem["conventional"], mem
