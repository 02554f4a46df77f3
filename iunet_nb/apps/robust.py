"""Numbers that hold beyond the noise: a plateau stopping rule, seed spreads, comparisons.

Three pieces, each a plain function of numbers (no training loop in here, so
that every task and the loop of :mod:`iunet_nb.train` can use them):

:class:`Plateau` (the documented plateau criterion)
    Evaluations ``v_1, v_2, ...`` of a validation metric, one per epoch.  An
    evaluation *improves* when it beats the best earlier value ``b`` by more
    than a relative ``min_delta``: ``v < b - min_delta * |b|`` when lower is
    better (``mode='min'``), ``v > b + min_delta * |b|`` when higher is better.
    Training stops after epoch ``n`` when

    * ``reason='plateau'``: ``n >= min_epochs`` and the last ``patience``
      evaluations brought no improvement, or
    * ``reason='max_epochs'``: ``n == max_epochs``, or
    * ``reason='non_finite'``: ``v_n`` is NaN or infinite.

    The rule is a function of the whole sequence (no hidden state), so a
    resumed run decides exactly as an uninterrupted one.

:func:`seed_spread`
    Runs ``train_and_evaluate(seed)`` for seeds ``0..k-1`` and returns, per
    metric, the mean, the sample standard deviation (``ddof=1``) and the
    per-seed values (:class:`Spread`).

:func:`beats` (the rule for "A beats B")
    ``rule='spread'`` (default): A's mean is better than B's by more than the
    sum of the two standard deviations, ``|mean_A - mean_B| > std_A + std_B``
    in A's favour.  A constant B (a bound such as the uniform density's bits
    per dimension) has standard deviation 0.  ``rule='paired'`` (same seeds
    for A and B, e.g. the same data split and initialisation seed): A is
    better on every seed and the mean of the per-seed differences exceeds
    their sample standard deviation.  Either rule is a conservative reading
    for a handful of seeds, not a significance test.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

__all__ = ["Plateau", "Stopped", "Spread", "seed_spread", "Comparison", "beats"]

_MODES = ("min", "max")


# ---------------------------------------------------------------------------------------------- plateau
@dataclass(frozen=True)
class Stopped:
    """Why training stopped.

    Attributes:
        reason: ``'plateau'``, ``'max_epochs'`` or ``'non_finite'``.
        epoch: the epoch after which it stopped (1-based, = number of evaluations).
        best_epoch: the epoch of the best value so far (1-based; 0 if none was finite).
        best: the best value so far (NaN if none was finite).
        message: one sentence for a reader.
    """

    reason: str
    epoch: int
    best_epoch: int
    best: float
    message: str


@dataclass(frozen=True)
class Plateau:
    """The plateau criterion (see the module docstring); call it with a training history.

    Args:
        metric: the validation metric's key in each history row (e.g. ``'bpd'``, ``'psnr'``).
        mode: ``'min'`` (lower is better, bits/dim) or ``'max'`` (PSNR, Dice).
        patience: evaluations without improvement before stopping (>= 1).
        min_delta: relative improvement that counts (>= 0; ``1e-3`` = 0.1 %).
        min_epochs: never stop for a plateau before this many epochs (>= 1).
        max_epochs: stop after this many epochs in any case (>= ``min_epochs``).
    """

    metric: str
    mode: str = "min"
    patience: int = 5
    min_delta: float = 1e-3
    min_epochs: int = 1
    max_epochs: int = 100

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"metric must be a metric name, got metric={self.metric!r}")
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got mode={self.mode!r}")
        if int(self.patience) != self.patience or self.patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got patience={self.patience!r}")
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise ValueError(f"min_delta must be a finite number >= 0, got min_delta={self.min_delta!r}")
        if int(self.min_epochs) != self.min_epochs or self.min_epochs < 1:
            raise ValueError(f"min_epochs must be an integer >= 1, got min_epochs={self.min_epochs!r}")
        if int(self.max_epochs) != self.max_epochs or self.max_epochs < self.min_epochs:
            raise ValueError(f"max_epochs must be an integer >= min_epochs={self.min_epochs}, "
                             f"got max_epochs={self.max_epochs!r}")

    def _improves(self, value: float, best: float) -> bool:
        if math.isnan(best):
            return True
        step = self.min_delta * abs(best)
        return value < best - step if self.mode == "min" else value > best + step

    def check(self, values: Sequence[float]) -> Stopped | None:
        """``None`` to go on after ``len(values)`` evaluations, else why to stop now.

        Only the last evaluation can trigger a stop: pass the whole sequence after every epoch.
        """
        best, best_epoch, since = math.nan, 0, 0
        for epoch, value in enumerate((float(v) for v in values), start=1):
            if not math.isfinite(value):
                return Stopped("non_finite", epoch, best_epoch, best,
                               f"{self.metric} is {value} at epoch {epoch}")
            if self._improves(value, best):
                best, best_epoch, since = value, epoch, 0
            else:
                since += 1
            if epoch >= self.min_epochs and since >= self.patience:
                return Stopped("plateau", epoch, best_epoch, best,
                               f"{self.metric} did not improve by more than {self.min_delta:g} (relative) "
                               f"for {self.patience} evaluations; best {best:.6g} at epoch {best_epoch}")
            if epoch >= self.max_epochs:
                return Stopped("max_epochs", epoch, best_epoch, best,
                               f"reached max_epochs={self.max_epochs}; best {self.metric} {best:.6g} at "
                               f"epoch {best_epoch}")
        return None

    def __call__(self, history: Sequence[Mapping[str, float]]) -> Stopped | None:
        """:meth:`check` on ``row[metric]`` of every row of a training history."""
        missing = [i for i, row in enumerate(history) if self.metric not in row]
        if missing:
            raise KeyError(f"Plateau(metric={self.metric!r}): history row {missing[0]} has no such key; "
                           f"it has {sorted(history[missing[0]])}")
        return self.check([row[self.metric] for row in history])


# ---------------------------------------------------------------------------------------------- seeds
@dataclass(frozen=True)
class Spread:
    """One metric over seeds: mean, sample standard deviation (``ddof=1``) and the per-seed values."""

    mean: float
    std: float
    values: tuple[float, ...]
    seeds: tuple[int, ...]

    @classmethod
    def of(cls, values: Sequence[float], seeds: Sequence[int] | None = None) -> "Spread":
        """The spread of ``values`` (at least 2, else the standard deviation is undefined)."""
        values = tuple(float(v) for v in values)
        if len(values) < 2:
            raise ValueError(f"a spread needs values of at least 2 seeds, got {len(values)}")
        seeds = tuple(range(len(values))) if seeds is None else tuple(int(s) for s in seeds)
        if len(seeds) != len(values):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(values)} values")
        return cls(statistics.fmean(values), statistics.stdev(values), values, seeds)

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.std:.2g} (n={len(self.values)})"


def seed_spread(train_and_evaluate: Callable[[int], Mapping[str, float]], seeds: int | Sequence[int] = 3
                ) -> dict[str, Spread]:
    """``train_and_evaluate(seed)`` for every seed (``int k``: seeds ``0..k-1``); a :class:`Spread` per metric.

    Every run must return the same metric names (numbers); a missing or extra one is an error.
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if len(seed_list) < 2:
        raise ValueError(f"seeds must give at least 2 seeds for a spread, got seeds={seeds!r}")
    if len(set(seed_list)) != len(seed_list):
        raise ValueError(f"seeds must be distinct, got seeds={seeds!r}")
    runs = [dict(train_and_evaluate(s)) for s in seed_list]
    names = list(runs[0])
    for seed, run in zip(seed_list, runs):
        if set(run) != set(names):
            raise ValueError(f"seed {seed} returned metrics {sorted(run)}, seed {seed_list[0]} {sorted(names)}")
    return {k: Spread.of([run[k] for run in runs], seed_list) for k in names}


# ---------------------------------------------------------------------------------------------- comparing
@dataclass(frozen=True)
class Comparison:
    """The outcome of :func:`beats`: ``holds`` and the numbers it rests on.

    Attributes:
        holds: whether A beats B beyond the spread under ``rule``.
        difference: mean improvement of A over B (positive: A better, in the metric's units).
        spread: what the difference had to exceed (``std_A + std_B``; paired: std of the differences).
        rule: ``'spread'`` or ``'paired'``.
        message: one sentence for a reader.
    """

    holds: bool
    difference: float
    spread: float
    rule: str
    message: str

    def __bool__(self) -> bool:
        return self.holds


def _as_spread(x: Spread | float, name: str) -> Spread:
    if isinstance(x, Spread):
        return x
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return Spread(float(x), 0.0, (float(x),), ())
    raise TypeError(f"{name} must be a Spread or a finite number, got {x!r}")


def beats(a: Spread | float, b: Spread | float, mode: str = "min", margin: float = 0.0,
          rule: str = "spread") -> Comparison:
    """Whether A is better than B by more than ``margin`` beyond the spread (see the module docstring).

    Args:
        a, b: :class:`Spread` s, or numbers (a fixed reference, standard deviation 0).
        mode: ``'min'`` (lower is better) or ``'max'``.
        margin: A must also be better by at least this much (metric units, >= 0).
        rule: ``'spread'``: ``difference > std_A + std_B`` and ``difference >= margin``;
            ``'paired'``: A better on every common seed and ``mean(d) > std(d)`` and ``mean(d) >= margin``
            for the per-seed differences ``d`` (both must be Spreads over the same seeds).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got mode={mode!r}")
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got margin={margin!r}")
    sa, sb = _as_spread(a, "a"), _as_spread(b, "b")
    sign = 1.0 if mode == "min" else -1.0  # difference > 0: A better
    if rule == "spread":
        difference = sign * (sb.mean - sa.mean)
        spread = sa.std + sb.std
        holds = difference > spread and difference >= margin
    elif rule == "paired":
        if not (isinstance(a, Spread) and isinstance(b, Spread)) or sa.seeds != sb.seeds:
            raise ValueError("rule='paired' needs two Spreads over the same seeds, got seeds "
                             f"{sa.seeds} and {sb.seeds}")
        d = [sign * (vb - va) for va, vb in zip(sa.values, sb.values)]
        difference, spread = statistics.fmean(d), statistics.stdev(d)
        holds = min(d) > 0 and difference > spread and difference >= margin
    else:
        raise ValueError(f"rule must be 'spread' or 'paired', got rule={rule!r}")
    verdict = "holds" if holds else "does not hold"
    message = (f"A better than B by {difference:.4g} ({'lower' if mode == 'min' else 'higher'} is better), "
               f"spread {spread:.2g}, margin {margin:g}: {verdict} (rule {rule!r})")
    return Comparison(holds, difference, spread, rule, message)
