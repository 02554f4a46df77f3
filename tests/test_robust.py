"""Plateau stopping, seed spreads and "A beats B beyond the spread" (:mod:`iunet_nb.apps.robust`),
the loop's ``stop`` rule, and a small flow experiment whose conclusion must not depend on the
number of threads."""
from __future__ import annotations

import importlib
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from iunet_nb.apps.robust import Plateau, Spread, beats, seed_spread

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- plateau
def _stop_epoch(rule: Plateau, values: list[float]):
    """Feed ``values`` one evaluation at a time, as the loop does; the first stop (or None)."""
    for n in range(1, len(values) + 1):
        stopped = rule.check(values[:n])
        if stopped is not None:
            assert stopped.epoch == n
            return stopped
    return None


def test_plateau_stops_exactly_patience_evaluations_after_the_last_improvement():
    rule = Plateau("bpd", "min", patience=3, min_delta=0.01, max_epochs=50)
    # improves (by > 1 %) up to epoch 4 (value 2.0), then only by < 1 % relative
    values = [4.0, 3.0, 2.5, 2.0, 1.99, 1.985, 1.981, 1.5, 1.0]
    stopped = _stop_epoch(rule, values)
    assert stopped.reason == "plateau" and stopped.epoch == 7
    assert stopped.best_epoch == 4 and stopped.best == 2.0
    assert "epoch 4" in stopped.message


def test_an_improvement_resets_the_count():
    rule = Plateau("psnr", "max", patience=2, min_delta=0.0, max_epochs=50)
    values = [10.0, 10.0, 11.0, 10.5, 11.0, 11.0]  # equal is no improvement with min_delta=0
    stopped = _stop_epoch(rule, values)
    assert stopped.reason == "plateau" and stopped.epoch == 5 and stopped.best_epoch == 3


def test_relative_delta_is_relative_to_the_best_value():
    # 0.5 % better than the best: an improvement with min_delta 0.004, not with 0.006
    values = [100.0, 99.5, 99.5]
    assert _stop_epoch(Plateau("m", patience=2, min_delta=0.004, max_epochs=9), values) is None
    assert _stop_epoch(Plateau("m", patience=2, min_delta=0.006, max_epochs=9), values).epoch == 3


def test_never_stops_for_a_plateau_before_min_epochs():
    flat = [1.0] * 20
    stopped = _stop_epoch(Plateau("m", patience=2, min_epochs=8, max_epochs=20), flat)
    assert stopped.reason == "plateau" and stopped.epoch == 8
    assert _stop_epoch(Plateau("m", patience=2, min_epochs=1, max_epochs=20), flat).epoch == 3


def test_max_epochs_and_non_finite():
    improving = [1.0 / n for n in range(1, 30)]
    stopped = _stop_epoch(Plateau("m", patience=3, max_epochs=10), improving)
    assert stopped.reason == "max_epochs" and stopped.epoch == 10 and stopped.best_epoch == 10
    stopped = _stop_epoch(Plateau("m", patience=3, min_epochs=5, max_epochs=10), [3.0, 2.0, math.nan, 1.0])
    assert stopped.reason == "non_finite" and stopped.epoch == 3 and stopped.best == 2.0


def test_plateau_reads_a_history_and_names_a_missing_metric():
    rule = Plateau("bpd", patience=1, max_epochs=5)
    assert rule([{"bpd": 3.0}]) is None
    assert rule([{"bpd": 3.0}, {"bpd": 3.0}]).reason == "plateau"
    with pytest.raises(KeyError, match="'bpd'.*row 1"):
        rule([{"bpd": 3.0}, {"psnr": 1.0}])


@pytest.mark.parametrize("kwargs, name", [
    (dict(mode="lower"), "mode"), (dict(patience=0), "patience"), (dict(min_delta=-0.1), "min_delta"),
    (dict(min_epochs=0), "min_epochs"), (dict(min_epochs=5, max_epochs=4), "max_epochs"),
    (dict(metric=""), "metric"),
])
def test_bad_plateau_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Plateau(**{"metric": "bpd", **kwargs})


# ---------------------------------------------------------------------------------------------- spreads
def test_seed_spread_mean_sample_std_and_per_seed_values():
    seen = []

    def fake(seed: int) -> dict[str, float]:
        seen.append(seed)
        return {"bpd": [3.0, 3.2, 3.4][seed], "psnr": 20.0 + seed}

    out = seed_spread(fake, 3)
    assert seen == [0, 1, 2]
    assert out["bpd"].mean == pytest.approx(3.2) and out["bpd"].std == pytest.approx(0.2)  # ddof=1
    assert out["bpd"].values == (3.0, 3.2, 3.4) and out["bpd"].seeds == (0, 1, 2)
    assert out["psnr"].std == pytest.approx(statistics.stdev([20, 21, 22])) == 1.0
    assert str(out["psnr"]) == "21 ± 1 (n=3)"
    assert seed_spread(fake, [2, 0])["bpd"].seeds == (2, 0)


def test_seed_spread_errors():
    with pytest.raises(ValueError, match="at least 2"):
        seed_spread(lambda s: {"a": 1.0}, 1)
    with pytest.raises(ValueError, match="distinct"):
        seed_spread(lambda s: {"a": 1.0}, [1, 1])
    with pytest.raises(ValueError, match="seed 1 returned metrics"):
        seed_spread(lambda s: {"a": 1.0} if s == 0 else {"b": 1.0}, 2)


def test_beats_beyond_the_spread():
    a = Spread.of([3.0, 3.1, 3.2])   # mean 3.1, std 0.1
    b = Spread.of([3.5, 3.6, 3.7])   # mean 3.6, std 0.1
    assert beats(a, b, "min").holds and beats(a, b).difference == pytest.approx(0.5)
    assert not beats(b, a, "min")  # the wrong direction
    assert beats(b, a, "max")
    close = Spread.of([3.3, 3.45, 3.6])  # mean 3.45, std 0.15: 0.35 apart, 0.25 spread: holds
    assert beats(a, close).holds and beats(a, close).spread == pytest.approx(0.25)
    closer = Spread.of([3.2, 3.35, 3.5])  # 0.25 apart, spread 0.25: not beyond
    assert not beats(a, closer).holds
    assert beats(a, 4.09, margin=0.9).holds and not beats(a, 4.09, margin=1.0).holds  # a bound


def test_beats_paired_rule():
    a = Spread.of([3.0, 3.5, 4.0])   # a large spread over seeds ...
    b = Spread.of([3.1, 3.6, 4.1])   # ... but on every seed 0.1 better
    assert not beats(a, b).holds      # not beyond the unpaired spread
    paired = beats(a, b, rule="paired")
    assert paired.holds and paired.difference == pytest.approx(0.1) and paired.spread == pytest.approx(0.0, abs=1e-12)
    mixed = Spread.of([3.1, 3.4, 4.1])  # worse on one seed
    assert not beats(a, mixed, rule="paired").holds
    with pytest.raises(ValueError, match="same seeds"):
        beats(a, Spread.of([1.0, 2.0, 3.0], seeds=[3, 4, 5]), rule="paired")


def test_beats_errors():
    a = Spread.of([1.0, 2.0])
    with pytest.raises(ValueError, match="mode"):
        beats(a, 3.0, mode="lower")
    with pytest.raises(ValueError, match="rule"):
        beats(a, 3.0, rule="t-test")
    with pytest.raises(ValueError, match="margin"):
        beats(a, 3.0, margin=-1)
    with pytest.raises(TypeError, match="b must be"):
        beats(a, "3")


# ---------------------------------------------------------------------------------------------- the loop
FLOW_TINY = dict(batch_size=128, lr=1e-2, progress=False, blocks=1, hidden=8, threads=1)


def test_loop_stops_at_the_plateau_and_says_why():
    from iunet_nb.train import train

    # min_delta 0.9: no epoch can improve 90 %, so it stops after 1 + patience epochs
    rule = Plateau("bpd", patience=1, min_delta=0.9, max_epochs=6)
    run = train("flow", stop=rule, **FLOW_TINY)
    assert len(run.history) == 2 and run.stopped.reason == "plateau" and run.stopped.best_epoch == 1
    run = train("flow", stop=Plateau("bpd", patience=5, max_epochs=2), **FLOW_TINY)
    assert len(run.history) == 2 and run.stopped.reason == "max_epochs"
    assert run.options["epochs"] == 2  # the plateau's max_epochs


def test_a_resumed_run_that_had_stopped_trains_no_further(tmp_path):
    from iunet_nb.train import train

    rule = Plateau("bpd", patience=1, min_delta=0.9, max_epochs=6)
    first = train("flow", stop=rule, out=str(tmp_path), **FLOW_TINY)
    again = train("flow", stop=rule, out=str(tmp_path), resume="auto", **FLOW_TINY)
    assert len(first.history) == len(again.history) == 2
    assert again.stopped == first.stopped
    assert again.history == first.history  # restored from the checkpoint, not retrained


def test_train_over_seeds(monkeypatch):
    T = importlib.import_module("iunet_nb.train")

    calls = []

    def fake_train(task, stop=None, **options):
        calls.append(options["seed"])
        history = [{"epoch": 1, "step": 3, "bpd": 3.0 + options["seed"], "seconds": 0.1}]
        return T.Run("flow", None, history, options, None)

    monkeypatch.setattr(T, "train", fake_train)
    out = T.train_over_seeds("flow", seeds=3, epochs=1)
    assert calls == [0, 1, 2] and set(out) == {"epoch", "bpd"}
    assert out["bpd"].mean == 4.0 and out["bpd"].std == 1.0
    with pytest.raises(TypeError, match="seeds="):
        T.train_over_seeds("flow", seed=3)


# ---------------------------------------------------------------------------------------------- threads
#: the small experiment: iUNet flows (1 block, width 8) on the digits, seeds 0..2, each trained
#: until its validation bits/dim improve by less than 2 % in an epoch (at most 4 epochs); prints
#: the per-seed bits/dim and epochs as JSON
_EXPERIMENT = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from iunet_nb.apps.robust import Plateau
from iunet_nb.train import train_over_seeds
rule = Plateau("bpd", "min", patience=1, min_delta=0.02, min_epochs=2, max_epochs=4)
out = train_over_seeds("flow", seeds=3, stop=rule, batch_size=128, lr=1e-2, progress=False, blocks=1,
                       hidden=8)
print(json.dumps({"threads": torch.get_num_threads(), "bpd": out["bpd"].values,
                  "epochs": out["epoch"].values}))
"""
#: the conclusion: the iUNet flow is below the uniform density's log2(17) = 4.09 bits/dim by
#: at least this much, beyond the seed spread
MARGIN = 0.8


@pytest.mark.slow
def test_conclusion_does_not_depend_on_the_thread_count():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    results = {}
    for threads in (1, 2):
        done = subprocess.run([sys.executable, "-c", _EXPERIMENT, str(threads)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results[threads] = json.loads(done.stdout.strip().splitlines()[-1])
        assert results[threads]["threads"] == threads
    bound = math.log2(17)
    verdicts = {t: beats(Spread.of(r["bpd"]), bound, "min", margin=MARGIN) for t, r in results.items()}
    assert verdicts[1].holds == verdicts[2].holds, {t: v.message for t, v in verdicts.items()}
    assert verdicts[1].holds, verdicts[1].message  # and the conclusion is the positive one
    # the thread count changes only the rounding of the reductions, not the numbers that matter
    for a, b in zip(results[1]["bpd"], results[2]["bpd"]):
        assert a == pytest.approx(b, abs=0.05)
