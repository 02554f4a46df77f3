"""Quality against training memory: iUNet and U-Net at several sizes, over seeds (issue 22, item 3).

The paper's argument is that an invertible network buys quality with memory
more cheaply.  This module makes that measurable for the ``segmentation3d``
and ``ct`` tasks:

:func:`plan_sweep`
    For each network, ``sizes`` widths (base channels ``w``; level ``i`` has
    ``w * 2**i``).  The U-Net's widths are given (:data:`SPECS`); each is
    measured once with ``nn.Conv`` and once with the package's tiled
    3^dim convolutions (:class:`iunet_nb.nn.conv.TiledConv`, as the iUNet's
    coupling functions use), and the U-Net keeps whichever needs less memory
    (equal terms for the convolutions).  Their measured step peaks are the
    targets; the iUNet width for each target is chosen with the predictor
    (:func:`iunet_nb.measure.predict.predict_step_memory`, the body only),
    mapped onto measured peaks by a least-squares line through the iUNet steps
    measured so far, and then measured (refined while the choice changes).
    Every step is measured with :func:`iunet_nb.measure.meter.measure_step`
    on the CPU: the task's own loss on a real training batch of ``batch_size``
    samples.
:func:`run_sweep`
    Trains every planned configuration over seeds (``trainer``: normally
    :func:`iunet_nb.train.train_over_seeds`, passed in because the training
    loop sits above this layer) until a :class:`~iunet_nb.apps.robust.Plateau`,
    and returns rows ``{"network", "config", "peak_mib", "metric", "mean", "std"}``
    (``peak_mib``: measured step peak, MiB; ``mean``/``std``: over seeds,
    sample std).  Metrics: ``dice`` (segmentation), ``psnr`` (dB) and ``ssim`` (CT).
:func:`pareto_front`, :func:`ahead_at_budgets`
    Per network, the configurations no cheaper configuration of the same
    network beats; and at each memory budget which network's best fitting
    configuration is ahead *beyond the spread* (:func:`~iunet_nb.apps.robust.beats`,
    rule ``'spread'``), or neither.
:func:`plot_sweep`
    Metric (with ± std error bars) against measured step peak (MiB, log
    axis), the Pareto fronts as step lines.
:func:`sweep_cli`
    ``python -m iunet_nb.train sweep TASK [--reduced] [--seeds N] [--out DIR]``:
    plan, run, write ``sweep.json`` and ``sweep.csv`` atomically and ``sweep-METRIC.png``.

The step peak is the meter's ``peak_bytes`` (activations, temporaries and the
gradients allocated by one forward + loss + backward), without the
parameters, the input and Adam's moments (two parameter-sized tensors).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from iunet_nb.apps import get_task
from iunet_nb.apps.robust import Plateau, Spread, Stopped, beats
from iunet_nb.apps.task import ENGINES, Task
from iunet_nb.common import MiB, write_bytes_atomically
from iunet_nb.measure.meter import StepMeasurement, measure_step
from iunet_nb.measure.predict import predict_step_memory
from iunet_nb.nn.conv import TiledConv

__all__ = ["SweepSpec", "SPECS", "NETWORKS", "ROW_KEYS", "PlannedConfig", "plan_sweep", "measure_config",
           "with_tiled_convs", "run_sweep", "pareto_front", "ahead_at_budgets", "plot_sweep", "sweep_cli",
           "write_results"]

NETWORKS = ("iunet", "unet")
#: the keys of a row of :func:`run_sweep`, in this order
ROW_KEYS = ("network", "config", "peak_mib", "metric", "mean", "std")
#: axis labels of the metrics (quantity and unit)
METRIC_LABELS = {"dice": "mean Dice over classes (1)", "psnr": "PSNR (dB)", "ssim": "SSIM (1)"}
#: keys of a configuration that are not options of the task
_CONFIG_ONLY = ("width", "tiled_convs")
#: options of the training loop a sweep may set (besides the task's own)
_LOOP_OPTIONS = ("batch_size", "lr", "engine", "epochs", "device", "threads", "workers")


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep of one task trains.

    Attributes:
        metrics: ``(name, mode)`` of every metric reported (``'max'``: higher is better); the first
            one decides the :class:`~iunet_nb.apps.robust.Plateau`.
        full, reduced: the options of every run (task and loop options by attribute name), for the
            full sweep and for ``--reduced``.
        unet_widths, reduced_unet_widths: the U-Net widths (base channels) for ``sizes=3``.
        plateau, reduced_plateau: keyword arguments of the :class:`Plateau`.
        seeds, reduced_seeds: default numbers of seeds.
    """

    metrics: tuple[tuple[str, str], ...]
    full: Mapping[str, Any]
    reduced: Mapping[str, Any]
    unet_widths: tuple[int, ...]
    reduced_unet_widths: tuple[int, ...]
    plateau: Mapping[str, Any] = field(default_factory=lambda: {"patience": 5, "min_epochs": 10,
                                                                         "max_epochs": 60})
    reduced_plateau: Mapping[str, Any] = field(default_factory=lambda: {"patience": 3, "max_epochs": 10})
    seeds: int = 3
    reduced_seeds: int = 2


SPECS: dict[str, SweepSpec] = {
    # the context task: classes differ in shape only, so width and receptive field matter
    "segmentation3d": SweepSpec(
        metrics=(("dice", "max"),),
        full=dict(data="context", in_channels=2, size=32, n_train=24, n_val=8, batch_size=2, lr=1e-2,
                  architecture=[1, 1, 1], engine="fused", progress=False),
        reduced=dict(data="context", in_channels=2, size=24, n_train=16, n_val=4, objects=8, batch_size=2, lr=1e-2,
                     architecture=[1, 1, 1], depth=1, engine="fused", progress=False),
        unet_widths=(4, 8, 16), reduced_unet_widths=(2, 4, 8),
        plateau={"patience": 4, "min_epochs": 8, "max_epochs": 20},
        reduced_plateau={"patience": 4, "min_epochs": 8, "max_epochs": 16}),
    "ct": SweepSpec(
        metrics=(("psnr", "max"), ("ssim", "max")),
        full=dict(dim=2, size=64, n_train=64, n_val=16, batch_size=8, architecture=[1, 1, 1, 1],
                  engine="fused", progress=False),
        reduced=dict(dim=2, size=32, n_train=32, n_val=8, angles=16, batch_size=4, architecture=[1, 1, 1],
                     engine="fused", progress=False),
        unet_widths=(4, 8, 16), reduced_unet_widths=(2, 4, 8),
        plateau={"patience": 3, "min_epochs": 6, "max_epochs": 20},
        reduced_plateau={"patience": 3, "min_epochs": 5, "max_epochs": 12}),
}

#: iUNet widths the planner may choose from (even: the couplings split the channels in halves)
IUNET_WIDTHS = (2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96)


# ---------------------------------------------------------------------------------------------- checks
def _spec(task: str) -> SweepSpec:
    if task not in SPECS:
        raise ValueError(f"task must be one of {sorted(SPECS)} for a sweep, got task={task!r}")
    return SPECS[task]


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {name}={value!r}")
    return int(value)


def _widths(values: Any, name: str) -> tuple[int, ...]:
    try:
        widths = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of ints >= 1, got {name}={values!r}") from None
    for w in widths:
        _check_int(w, name, 1)
    if not widths or len(set(widths)) != len(widths):
        raise ValueError(f"{name} must be distinct ints >= 1, got {name}={values!r}")
    return tuple(sorted(int(w) for w in widths))


def _geometric_widths(widths: Sequence[int], sizes: int) -> tuple[int, ...]:
    """``sizes`` distinct widths spaced geometrically between the first and the last of ``widths``."""
    lo, hi = min(widths), max(widths)
    if sizes == len(widths):
        return tuple(widths)
    out = sorted({int(round(lo * (hi / lo) ** (i / (sizes - 1)))) for i in range(sizes)})
    w = hi
    while len(out) < sizes:  # rounding merged some: extend upwards
        w += 1
        if w not in out:
            out.append(w)
    return tuple(sorted(out))


# ---------------------------------------------------------------------------------------------- models
def with_tiled_convs(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.ConvNd(c_in, c_out, 3, padding=1)`` (stride 1, one group, zero
    padding) of ``model`` by a :class:`~iunet_nb.nn.conv.TiledConv` holding the same weights.

    The same function (state dicts load into each other); on CPU the convolutions run slab by
    slab, without oneDNN's activation-sized buffers.  Returns ``model``.
    """
    for name, child in list(model.named_children()):
        if (isinstance(child, nn.modules.conv._ConvNd) and not child.transposed
                and child.kernel_size == (3,) * len(child.kernel_size)
                and child.padding == (1,) * len(child.kernel_size)
                and child.stride == (1,) * len(child.kernel_size)
                and child.dilation == (1,) * len(child.kernel_size)
                and child.groups == 1 and child.padding_mode == "zeros"):
            tiled = TiledConv(child.in_channels, child.out_channels, len(child.kernel_size),
                              bias=child.bias is not None)
            tiled.load_state_dict(child.state_dict())
            setattr(model, name, tiled.to(child.weight.device))
        else:
            with_tiled_convs(child)
    return model


def _task_of(task: str, config: Mapping[str, Any]) -> Task:
    """The task, with its model's 3^dim convolutions tiled when ``config['tiled_convs']``."""
    base = get_task(task)
    if not config.get("tiled_convs"):
        return base
    return dataclasses.replace(base, model=lambda opts: with_tiled_convs(base.model(opts)))


def _config(task: str, network: str, width: int, levels: int, tiled: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {"width": width, "channels": [width * 2 ** i for i in range(levels)],
                              "tiled_convs": tiled}
    if task == "ct" and network == "unet":
        config["unet_width"] = width  # the ct task's U-Net takes its width here (channels: levels)
    return config


def _options(network: str, config: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """The options of :func:`train` for one configuration."""
    return {**base, **{k: v for k, v in config.items() if k not in _CONFIG_ONLY}, "arch": network}


def _namespace(task: Task, options: Mapping[str, Any]) -> argparse.Namespace:
    """The task's defaults updated by ``options`` (task and loop options by attribute name)."""
    parser = argparse.ArgumentParser(add_help=False)
    task.add_arguments(parser)
    opts = parser.parse_args([])
    opts.seed, opts.engine, opts.batch_size = 0, "fused", 8
    known = set(vars(opts)) | set(_LOOP_OPTIONS) | {"progress", "out", "resume"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for task {task.name!r}; valid: {sorted(known)}")
    for k, v in options.items():
        setattr(opts, k, v)
    if opts.engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got engine={opts.engine!r}")
    return opts


class _TaskStep(nn.Module):
    """``x -> task.loss(model, (x, *rest))``: one training step's loss, for :func:`measure_step`."""

    def __init__(self, task: Task, model: nn.Module, rest: tuple[Tensor, ...]) -> None:
        super().__init__()
        self.task, self.model, self.rest = task, model, rest

    def forward(self, x: Tensor) -> Tensor:
        return self.task.loss(self.model, (x, *self.rest))


def measure_config(task: str, network: str, config: Mapping[str, Any], base: Mapping[str, Any],
                   seed: int = 0) -> tuple[StepMeasurement, nn.Module]:
    """Measure one training step of a configuration on the CPU; returns ``(measurement, model)``.

    The step is the task's loss on the first ``batch_size`` training samples of seed ``seed``
    (images ``(batch_size, C, *S)``), forward + backward.  ``measurement.peak_bytes`` is the step
    peak in bytes (see :class:`~iunet_nb.measure.meter.StepMeasurement`).
    """
    t = _task_of(task, config)
    opts = _namespace(t, _options(network, config, base))
    opts.seed = seed
    torch.manual_seed(seed)
    train_set, _ = t.datasets(opts)
    batch = [torch.stack(items) for items in zip(*(train_set[i] for i in range(opts.batch_size)))]
    model = t.model(opts)
    from iunet_nb.notebook.helpers import quiet_native_stderr

    with quiet_native_stderr():
        m = measure_step(_TaskStep(t, model, tuple(batch[1:])), batch[0], lambda loss: loss, device="cpu")
    return m, model


# ---------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class PlannedConfig:
    """One configuration of a sweep and its memory (MiB = 2**20 bytes).

    Attributes:
        network: ``'iunet'`` or ``'unet'``.
        config: ``width`` (base channels), ``channels`` per level, ``tiled_convs`` (the U-Net's
            3^dim convolutions are :class:`~iunet_nb.nn.conv.TiledConv`), and for the ct U-Net
            ``unet_width``.
        predicted_peak_mib: the predictor's step peak of the body (iUNet: its engine; U-Net: mode
            ``'unet'``, plain convolutions), without the 1x1 lift/projection and the loss.
        measured_peak_mib: the measured step peak of the whole training step.
        measured_total_mib: parameters + input + measured step peak.
        other_peak_mib: U-Net only: the measured step peak with the other convolutions
            (untiled when ``tiled_convs``, else tiled); ``None`` for the iUNet.
        target_mib: iUNet only: the U-Net peak it was chosen to match.
    """

    network: str
    config: dict[str, Any]
    predicted_peak_mib: float | None
    measured_peak_mib: float
    measured_total_mib: float
    other_peak_mib: float | None = None
    target_mib: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


def _predicted_peak(network: str, model: nn.Module, base: Mapping[str, Any], batch: int,
                    spatial: Sequence[int], engine: str) -> float | None:
    """The predictor's step peak (MiB) of the body of ``model`` (a ChannelLift), or None."""
    body = getattr(model, "body", None)
    if body is None:
        return None
    width = body.channels[0]
    try:
        p = predict_step_memory(body, (batch, width, *spatial), mode=engine if network == "iunet" else "unet")
    except (ValueError, TypeError):
        return None
    return p.peak_step / MiB


def _spatial(task: str, base: Mapping[str, Any]) -> tuple[int, ...]:
    if base.get("shape"):
        return tuple(base["shape"])
    dim = 3 if task == "segmentation3d" else int(base.get("dim", 2))
    return (int(base["size"]),) * dim


def plan_sweep(task: str, sizes: int = 3, *, reduced: bool = False, base: Mapping[str, Any] | None = None,
               unet_widths: Sequence[int] | None = None, iunet_widths: Sequence[int] = IUNET_WIDTHS,
               refinements: int = 3) -> list[PlannedConfig]:
    """``sizes`` configurations per network spanning the same measured step peaks (see the module docstring).

    Args:
        task: ``'segmentation3d'`` or ``'ct'``.
        sizes: configurations per network (>= 3 for the issue's figure; >= 2 accepted).
        reduced: start from :attr:`SweepSpec.reduced` instead of :attr:`SweepSpec.full`.
        base: options that replace those of the spec (e.g. ``{"size": 24}``).
        unet_widths: the U-Net widths (default: the spec's, spread geometrically to ``sizes``).
        iunet_widths: the iUNet widths to choose from.
        refinements: at most this many rounds of (fit, choose, measure) for the iUNet.

    Returns:
        The U-Net's configurations (by width), then the iUNet's (by target), each with its
        predicted and measured step peak.
    """
    spec = _spec(task)
    sizes = _check_int(sizes, "sizes", 2)
    _check_int(refinements, "refinements", 1)
    opts = {**(spec.reduced if reduced else spec.full), **(base or {})}
    default = spec.reduced_unet_widths if reduced else spec.unet_widths
    unet_widths = _widths(unet_widths, "unet_widths") if unet_widths is not None \
        else _geometric_widths(default, sizes)
    if len(unet_widths) != sizes:
        raise ValueError(f"unet_widths must have sizes={sizes} widths, got unet_widths={list(unet_widths)}")
    candidates = _widths(iunet_widths, "iunet_widths")
    if len(candidates) < sizes:
        raise ValueError(f"iunet_widths must offer at least sizes={sizes} widths, got {list(candidates)}")
    levels = len(_namespace(get_task(task), opts).architecture)
    batch, spatial, engine = int(opts["batch_size"]), _spatial(task, opts), opts.get("engine", "fused")

    def measure(network: str, config: dict) -> tuple[StepMeasurement, nn.Module]:
        return measure_config(task, network, config, opts)

    planned: list[PlannedConfig] = []
    for w in unet_widths:  # U-Net: measured with both convolutions, the cheaper one kept
        plain, model = measure("unet", _config(task, "unet", w, levels, False))
        tiled, _ = measure("unet", _config(task, "unet", w, levels, True))
        use_tiled = tiled.peak_bytes < plain.peak_bytes
        best, other = (tiled, plain) if use_tiled else (plain, tiled)
        planned.append(PlannedConfig("unet", _config(task, "unet", w, levels, use_tiled),
                                     _predicted_peak("unet", model, opts, batch, spatial, engine),
                                     best.peak_bytes / MiB, best.total_bytes / MiB, other.peak_bytes / MiB))
    targets = [p.measured_peak_mib for p in planned]

    predicted: dict[int, float] = {}
    for w in candidates:  # the predictor: no allocation, a model built on the CPU
        with torch.random.fork_rng():
            try:
                model = get_task(task).model(_namespace(get_task(task), _options("iunet", _config(
                    task, "iunet", w, levels), opts)))
            except (ValueError, RuntimeError, AssertionError):
                continue  # not a valid iUNet
        value = _predicted_peak("iunet", model, opts, batch, spatial, engine)
        if value is not None and value > 0:
            predicted[w] = value
    if len(predicted) < sizes:
        raise ValueError(f"only {len(predicted)} of iunet_widths={list(candidates)} give a valid iUNet "
                         f"for task {task!r}; need sizes={sizes}")

    measured: dict[int, StepMeasurement] = {}
    ws = sorted(predicted)
    # two anchors: the candidates the raw predictor puts nearest the smallest and largest target
    for t in (targets[0], targets[-1]):
        w = min(ws, key=lambda v: abs(math.log(predicted[v] / t)))
        measured.setdefault(w, measure("iunet", _config(task, "iunet", w, levels))[0])
    choice: list[int] = []
    for _ in range(refinements):
        new = _choose(ws, predicted, measured, targets)
        for w in new:
            if w not in measured:
                measured[w] = measure("iunet", _config(task, "iunet", w, levels))[0]
        if new == choice:
            break
        choice = new
    for w, t in zip(choice, targets):
        m = measured[w]
        planned.append(PlannedConfig("iunet", _config(task, "iunet", w, levels), predicted[w],
                                     m.peak_bytes / MiB, m.total_bytes / MiB, None, t))
    return planned


def _choose(ws: list[int], predicted: Mapping[int, float], measured: Mapping[int, StepMeasurement],
            targets: Sequence[float]) -> list[int]:
    """Distinct iUNet widths, one per target, whose estimated peak is nearest (in log) to it.

    The estimate is the measured peak where there is one, else ``a + b * predicted`` fitted by
    least squares to the measured widths (the predictor covers the body, the step also the
    1x1 convolutions and the loss).
    """
    xs = np.array([predicted[w] for w in measured])
    ys = np.array([measured[w].peak_bytes / MiB for w in measured])
    if len(set(xs.tolist())) >= 2:
        b, a = np.polyfit(xs, ys, 1)
    else:
        a, b = 0.0, float(ys[0] / xs[0])
    estimate = {w: measured[w].peak_bytes / MiB if w in measured else max(a + b * predicted[w], 1e-9)
                for w in ws}
    chosen: list[int] = []
    for t in targets:  # ascending targets, ascending widths, no width twice
        free = [w for w in ws if w not in chosen and (not chosen or w > chosen[-1])] or \
            [w for w in ws if w not in chosen]
        chosen.append(min(free, key=lambda w: abs(math.log(estimate[w] / t))))
    return chosen


# ---------------------------------------------------------------------------------------------- running
def _plan_items(configs: Sequence[PlannedConfig | Mapping[str, Any]]) -> list[tuple[str, dict, float]]:
    items = []
    for i, c in enumerate(configs):
        d = c.as_dict() if isinstance(c, PlannedConfig) else dict(c)
        missing = [k for k in ("network", "config", "measured_peak_mib") if k not in d]
        if missing:
            raise ValueError(f"configs[{i}] lacks {missing}: pass the PlannedConfigs of plan_sweep")
        if d["network"] not in NETWORKS:
            raise ValueError(f"configs[{i}]: network must be one of {NETWORKS}, got {d['network']!r}")
        items.append((d["network"], dict(d["config"]), float(d["measured_peak_mib"])))
    if not items:
        raise ValueError("configs is empty: nothing to train")
    return items


def run_sweep(task: str, configs: Sequence[PlannedConfig | Mapping[str, Any]], seeds: int | Sequence[int] = 3,
              stop: Callable[[list[dict[str, float]]], Stopped | None] | None = None, *,
              trainer: Callable[..., Mapping[str, Spread]], reduced: bool = False,
              base: Mapping[str, Any] | None = None, log: Callable[[str], None] | None = None
              ) -> list[dict[str, Any]]:
    """Train every configuration over ``seeds``; one row per configuration and metric.

    Args:
        task: ``'segmentation3d'`` or ``'ct'``.
        configs: :class:`PlannedConfig` s (or their :meth:`~PlannedConfig.as_dict`) of :func:`plan_sweep`.
        seeds: as :func:`iunet_nb.train.train_over_seeds` (``int k``: seeds ``0..k-1``; >= 2).
        stop: the stopping rule; default the spec's :class:`Plateau` on its first metric.
        trainer: ``trainer(task, seeds, stop, **options) -> {metric: Spread}``, i.e.
            :func:`iunet_nb.train.train_over_seeds` (``iunet_nb.train.run_sweep`` passes it).
        reduced, base: the options, as for :func:`plan_sweep` (use the same).
        log: called with one line per trained configuration (e.g. ``print``).

    Returns:
        Rows ``{"network", "config", "peak_mib", "metric", "mean", "std"}`` (:data:`ROW_KEYS`).
    """
    spec = _spec(task)
    if not callable(trainer):
        raise TypeError(f"trainer must be a callable like iunet_nb.train.train_over_seeds, got {trainer!r}")
    if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds < 2:
        raise ValueError(f"seeds must give at least 2 seeds for a spread, got seeds={seeds!r}")
    items = _plan_items(configs)
    opts = {**(spec.reduced if reduced else spec.full), **(base or {})}
    if stop is None:
        stop = Plateau(spec.metrics[0][0], spec.metrics[0][1],
                       **(spec.reduced_plateau if reduced else spec.plateau))
    rows: list[dict[str, Any]] = []
    for network, config, peak in items:
        start = time.perf_counter()
        spreads = trainer(_task_of(task, config), seeds, stop, **_options(network, config, opts))
        for metric, _ in spec.metrics:
            s = spreads[metric]
            rows.append({"network": network, "config": config, "peak_mib": peak, "metric": metric,
                         "mean": s.mean, "std": s.std})
        if log is not None:
            log(f"{network} width {config['width']}: peak {peak:.1f} MiB, "
                + ", ".join(f"{m} {spreads[m]}" for m, _ in spec.metrics)
                + f", epochs {spreads['epoch']}, {time.perf_counter() - start:.0f} s")
    return rows


# ---------------------------------------------------------------------------------------------- reading
def _check_rows(rows: Sequence[Mapping[str, Any]], metric: str | None) -> tuple[list[Mapping[str, Any]], str]:
    rows = list(rows)
    for i, row in enumerate(rows):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"rows[{i}] lacks {missing}; a row has the keys {list(ROW_KEYS)}")
        if row["network"] not in NETWORKS:
            raise ValueError(f"rows[{i}]: network must be one of {NETWORKS}, got {row['network']!r}")
    metrics = sorted({r["metric"] for r in rows})
    if metric is None:
        if len(metrics) != 1:
            raise ValueError(f"the rows hold the metrics {metrics}: pick one with metric=...")
        metric = metrics[0]
    elif metric not in metrics:
        raise ValueError(f"metric={metric!r} is not in the rows (they hold {metrics})")
    return [r for r in rows if r["metric"] == metric], metric


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def pareto_front(rows: Sequence[Mapping[str, Any]], metric: str | None = None, mode: str = "max"
                 ) -> dict[str, list[Mapping[str, Any]]]:
    """Per network, its Pareto front: the rows (of ``metric``) whose mean is better than that of
    every row of the same network with a smaller or equal ``peak_mib``; sorted by ``peak_mib``.

    A network without rows gets an empty list.  ``mode='max'``: higher is better.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got mode={mode!r}")
    rows, metric = _check_rows(rows, metric)
    fronts: dict[str, list[Mapping[str, Any]]] = {}
    for network in NETWORKS:
        front: list[Mapping[str, Any]] = []
        # at equal memory, the better row first (it then dominates the other)
        ordered = sorted((r for r in rows if r["network"] == network),
                         key=lambda r: (r["peak_mib"], -r["mean"] if mode == "max" else r["mean"]))
        for r in ordered:
            if not front or _better(r["mean"], front[-1]["mean"], mode):
                front.append(r)
        fronts[network] = front
    return fronts


def ahead_at_budgets(rows: Sequence[Mapping[str, Any]], metric: str | None = None, mode: str = "max",
                     budgets: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Which network is ahead at each memory budget (MiB of measured step peak).

    At budget ``B`` each network offers its best configuration with ``peak_mib <= B`` (the last
    point of its Pareto front below ``B``).  ``ahead`` is the network whose offer beats the other's
    beyond the spread (:func:`~iunet_nb.apps.robust.beats`, rule ``'spread'``:
    ``|mean difference| > std_A + std_B``), the only network with an offer, or ``None`` (neither:
    the difference is within the spread, or nothing fits).

    Args:
        budgets: MiB; default every distinct ``peak_mib`` of the rows (where an offer changes).
    Returns:
        One dict per budget, ascending: ``budget_mib``, ``iunet`` and ``unet`` (the offered row
        or ``None``), ``ahead`` (``'iunet'``, ``'unet'`` or ``None``), ``difference`` (iUNet minus
        U-Net mean, metric units; ``None`` unless both offer) and ``message``.
    """
    fronts = pareto_front(rows, metric, mode)
    if budgets is None:
        budgets = sorted({r["peak_mib"] for f in fronts.values() for r in f})
    else:
        budgets = sorted(float(b) for b in budgets)
        if any(not (math.isfinite(b) and b > 0) for b in budgets):
            raise ValueError(f"budgets must be positive numbers of MiB, got budgets={list(budgets)}")
    out = []
    for budget in budgets:
        offer = {n: next((r for r in reversed(f) if r["peak_mib"] <= budget), None) for n, f in fronts.items()}
        i, u = offer["iunet"], offer["unet"]
        difference = None
        if i is None and u is None:
            ahead, message = None, "nothing fits"
        elif i is None or u is None:
            ahead = "iunet" if u is None else "unet"
            message = f"only the {ahead} fits"
        else:
            si, su = (Spread(r["mean"], r["std"], (), ()) for r in (i, u))
            difference = i["mean"] - u["mean"]
            if beats(si, su, mode):
                ahead, message = "iunet", beats(si, su, mode).message
            elif beats(su, si, mode):
                ahead, message = "unet", beats(su, si, mode).message
            else:
                ahead = None
                message = (f"within the spread: difference {difference:.4g}, spread "
                           f"{i['std'] + u['std']:.2g}")
        out.append({"budget_mib": budget, "iunet": i, "unet": u, "ahead": ahead, "difference": difference,
                    "message": message})
    return out


def plot_sweep(rows: Sequence[Mapping[str, Any]], metric: str | None = None, mode: str = "max", ax=None,
               title: str | None = None):
    """Metric (mean ± std over seeds) against measured step peak (MiB, log axis), both networks,
    their Pareto fronts as step lines (a front's value holds until its next point). Returns the axes."""
    import matplotlib.pyplot as plt

    from iunet_nb.notebook.plots import place_legend

    fronts = pareto_front(rows, metric, mode)
    rows, metric = _check_rows(rows, metric)
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    colours = {"iunet": "tab:blue", "unet": "tab:orange"}
    names = {"iunet": "iUNet", "unet": "U-Net"}
    right = max(r["peak_mib"] for r in rows) * 1.3
    for network in NETWORKS:
        mine = sorted((r for r in rows if r["network"] == network), key=lambda r: r["peak_mib"])
        if not mine:
            continue
        ax.errorbar([r["peak_mib"] for r in mine], [r["mean"] for r in mine], yerr=[r["std"] for r in mine],
                    fmt="o", capsize=3, color=colours[network], label=f"{names[network]} (± std over seeds)")
        for r in mine:
            ax.annotate(f"w={r['config']['width']}", (r["peak_mib"], r["mean"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color=colours[network])
        f = fronts[network]
        ax.step([r["peak_mib"] for r in f] + [right], [r["mean"] for r in f] + [f[-1]["mean"]], where="post",
                color=colours[network], alpha=0.7, label=f"{names[network]} Pareto front")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 2, 5, 10 instead of 2 x 10^0
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("measured training-step peak (MiB)")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    if title:
        ax.set_title(title)
    place_legend(ax, "best", fontsize=8)
    return ax


# ---------------------------------------------------------------------------------------------- files and CLI
def _csv_bytes(rows: Sequence[Mapping[str, Any]]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["network", "width", "config", "peak_mib", "metric", "mean", "std"])
    for r in rows:
        writer.writerow([r["network"], r["config"]["width"], json.dumps(r["config"], sort_keys=True),
                         f"{r['peak_mib']:.6g}", r["metric"], f"{r['mean']:.6g}", f"{r['std']:.6g}"])
    return text.getvalue().encode()


def write_results(out: str | Path, task: str, result: Mapping[str, Any]) -> list[Path]:
    """``OUT/sweep.json`` (everything), ``OUT/sweep.csv`` (the rows), each written atomically, and
    ``OUT/sweep-METRIC.png`` per metric.  Returns the paths."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "sweep.json", out / "sweep.csv"]
    write_bytes_atomically(paths[0], (json.dumps(result, indent=1, sort_keys=False) + "\n").encode())
    write_bytes_atomically(paths[1], _csv_bytes(result["sweep"]))
    for metric, mode in _spec(task).metrics:
        ax = plot_sweep(result["sweep"], metric, mode, title=f"{task}: quality against training memory")
        buffer = io.BytesIO()
        ax.figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
        paths.append(out / f"sweep-{metric}.png")
        write_bytes_atomically(paths[-1], buffer.getvalue())
    return paths


def build_sweep_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m iunet_nb.train sweep``."""
    parser = argparse.ArgumentParser(prog="python -m iunet_nb.train sweep",
                                     description="Quality against measured training memory, iUNet and U-Net "
                                                 "(issue 22, item 3)",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("task", choices=sorted(SPECS), help="the task to sweep")
    parser.add_argument("--reduced", action="store_true", help="the small sweep (minutes on a laptop CPU)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (>= 2; default: "
                                                                "the spec's, 3 full, 2 reduced)")
    parser.add_argument("--sizes", type=int, default=3, help="configurations per network (>= 2)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/sweep-TASK[-reduced])")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave it)")
    parser.add_argument("--max-epochs", type=int, default=None, help="override the plateau's max_epochs")
    return parser


def sweep_cli(argv: Sequence[str], trainer: Callable[..., Mapping[str, Spread]]) -> int:
    """``python -m iunet_nb.train sweep TASK [--reduced] [--seeds N] [--out DIR]``; returns the exit code."""
    args = build_sweep_parser().parse_args(list(argv))
    spec = SPECS[args.task]
    seeds = args.seeds if args.seeds is not None else (spec.reduced_seeds if args.reduced else spec.seeds)
    for name, value, low in (("--seeds", seeds, 2), ("--sizes", args.sizes, 2), ("--threads", args.threads, 0)):
        if value < low:
            print(f"python -m iunet_nb.train sweep: error: {name} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    if args.max_epochs is not None and args.max_epochs < 1:
        print(f"python -m iunet_nb.train sweep: error: --max-epochs must be >= 1, got {args.max_epochs}",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or Path("runs") / f"sweep-{args.task}{'-reduced' if args.reduced else ''}")
    plateau = dict(spec.reduced_plateau if args.reduced else spec.plateau)
    if args.max_epochs is not None:
        plateau["max_epochs"] = args.max_epochs
        plateau["min_epochs"] = min(plateau.get("min_epochs", 1), args.max_epochs)
    stop = Plateau(spec.metrics[0][0], spec.metrics[0][1], **plateau)
    start = time.perf_counter()
    plan = plan_sweep(args.task, args.sizes, reduced=args.reduced)
    planned_s = time.perf_counter() - start
    for p in plan:
        print(f"plan: {p.network} width {p.config['width']}: measured peak {p.measured_peak_mib:.1f} MiB "
              f"(predicted body {p.predicted_peak_mib or float('nan'):.1f} MiB)", flush=True)
    rows = run_sweep(args.task, plan, seeds, stop, trainer=trainer, reduced=args.reduced,
                     log=lambda line: print(line, flush=True))
    result = {
        "task": args.task, "reduced": args.reduced, "seeds": seeds, "threads": torch.get_num_threads(),
        "options": dict(spec.reduced if args.reduced else spec.full), "plateau": plateau,
        "plan": [p.as_dict() for p in plan], "sweep": rows,
        "ahead": {m: [{k: (v["config"]["width"] if isinstance(v, Mapping) else v) for k, v in a.items()}
                      for a in ahead_at_budgets(rows, m, mode)] for m, mode in spec.metrics},
        "seconds": {"plan": planned_s, "total": time.perf_counter() - start},
    }
    for path in write_results(out, args.task, result):
        print(f"wrote {path}")
    for m, _ in spec.metrics:
        for a in result["ahead"][m]:
            print(f"{m} at {a['budget_mib']:.1f} MiB: ahead {a['ahead']} ({a['message']})")
    return 0
