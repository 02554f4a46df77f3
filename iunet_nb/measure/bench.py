"""Table 1 of the iUNet paper, re-measured: ``python -m iunet_nb.bench table1``
(and the largest trainable 3D volume: ``python -m iunet_nb.bench volume3d``, see
:mod:`iunet_nb.measure.bench3d`).

Table 1 of the paper (Etmann, Ke & Schönlieb, MLSP 2020) compares memory-efficient (ME) and conventional backpropagation for a
64-channel 2D iUNet with 4 downsamplings (channels doubling per level:
64/128/256/512/1024), ``delta`` additive coupling layers per block and side
(architecture ``[delta] * 5``) on ``64 x 512 x 512`` inputs, batch 1, on a GPU.

This module measures the same grid for every training mode

``conventional``     the iUNet with plain autograd (``disable_custom_gradient=True``)
``fused``            the iUNet with this package's fused ME engine
``fused_consuming``  the same engine in its opt-in consuming mode (``consume_output=True``:
                     the backward reuses the memory of the output and its gradient)
``memcnn``           the iUNet with every step wrapped in memcnn (as in the paper)
``unet``             a plain U-Net with the same channels and blocks
``unet_checkpoint``  that U-Net with activation checkpointing per level
``iunets``           the reference package ``iunets`` 0.1 (memcnn inside), if importable

each configuration in a fresh subprocess (``python -m iunet_nb.bench _one
--json ...``) so that one cannot inflate the next.  Memory is taken with
:func:`iunet_nb.measure.meter.measure_step` (total = parameters + input + step peak),
time with :func:`iunet_nb.measure.meter.time_step` (no profiler, one thread by
default).  Rows are appended to ``<out>/table1-<timestamp>.csv`` as each
configuration finishes; ``table1-latest.csv`` and a PNG plot are written at the
end.  From two or more sizes the total is extrapolated to 512 x 512 with a fit
``a + b * H * W`` per mode and ``delta``.

CPU sizes are small (default 64 and 128) so that the default run takes a few
minutes on two cores; ``--size 512 --deltas 30 --modes conventional fused``
measures the paper's size directly (about 13 GiB for conventional).
"""
from __future__ import annotations

import argparse
import csv
import io
import datetime as _dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from iunet_nb.common import GiB, write_bytes_atomically

__all__ = [
    "ALL_MODES",
    "ME_MODES",
    "CSV_COLUMNS",
    "PAPER_PARAMETERS",
    "build_model",
    "measure_config",
    "run_config",
    "load_paper_table",
    "read_results",
    "run_table1",
    "summarize",
    "format_report",
    "plot_results",
    "Table1Run",
    "main",
]

REPO = Path(__file__).resolve().parents[2]
PAPER_CSV = REPO / "data" / "paper_table1.csv"
DEFAULT_OUT = REPO / "data" / "results"

ALL_MODES = ("conventional", "fused", "fused_consuming", "memcnn", "unet", "unet_checkpoint", "iunets")
ME_MODES = ("fused", "fused_consuming", "memcnn", "iunets")
#: modes the predictor (:mod:`iunet_nb.measure.predict`) does not model: no predicted column
UNPREDICTED_MODES = ("fused_consuming",)
DEFAULT_SIZES = (64, 128)
DTYPES = ("float32", "float64", "float16", "bfloat16")
DEFAULT_DELTAS = (5, 10, 20, 30)
CHANNELS = (64, 128, 256, 512, 1024)
PAPER_SIZE = 512
#: learnable parameters of the Table 1 model at delta = 5 and 30 as the reference implementation
#: iunets 0.1 counts them; :func:`_parameter_check` compares both packages with these
PAPER_PARAMETERS = {5: 32_158_080, 30: 189_390_080}

CSV_COLUMNS = [
    "run", "mode", "size", "delta", "dtype", "device", "threads", "status", "parameters",
    "param_bytes", "input_bytes", "grad_bytes", "activation_bytes", "peak_bytes", "total_bytes",
    "total_gib", "overhead_tensors", "seconds", "seconds_all", "predicted_total_bytes",
    "prediction_error", "message", "optimizer", "state_bytes", "loss",
]

#: ``--losses`` choices: the meter's ``mean_square`` (:func:`iunet_nb.measure.meter.default_loss`,
#: a backward that allocates only ``dL/dy``; Table 1 proper) and ``torch``, the loss a user writes,
#: ``y.float().square().mean()``.  The runtime section of the report compares them side by side.
LOSS_CHOICES = ("mean_square", "torch")

#: ``--optimizer`` choices; the update is part of the measured step (``none``: Table 1 as in the paper)
OPTIMIZER_CHOICES = ("none", "sgd", "adamw")
#: learning rates used for the measured optimizer steps (the memory does not depend on them)
OPTIMIZER_KWARGS = {"sgd": dict(lr=1e-3), "adamw": dict(lr=1e-3)}

#: the fused engine's targets (activation overhead, fraction of the paper's ME memory, runtime and
#: memory relative to conventional); checked by :func:`summarize`
TARGETS = dict(overhead_spread=0.05, overhead_tensors=5.0, paper_fraction=0.85,
               runtime_ratio=1.40, memory_ratio_512=0.15, consuming_overhead_tensors=2.5,
               large_overhead_tensors=3.5, runtime_ratio_every_size=1.35, time_vs_iunets=1 / 1.3)
#: Sizes from which the stricter targets (``large_overhead_tensors``, ``runtime_ratio_every_size``,
#: ``time_vs_iunets``) are checked: overhead from 256^2, speed from 128^2.
LARGE_OVERHEAD_MIN_SIZE, SPEED_MIN_SIZE = 256, 128


# ----------------------------------------------------------------------------- models
def iunets_available() -> bool:
    """Whether the reference package ``iunets`` can be imported (memcnn imported safely first)."""
    try:
        from iunet_nb.engine.memcnn import import_memcnn

        import_memcnn()
        import iunets  # noqa: F401
    except Exception:
        return False
    return True


def build_model(mode: str, delta: int, *, dtype: Any = None, device: Any = "cpu", seed: int = 0):
    """The Table 1 model of ``mode`` with ``delta`` couplings (blocks) per level and side."""
    import torch

    from iunet_nb.arch.baselines import UNet
    from iunet_nb.arch.iunet import iUNet

    torch.manual_seed(seed)
    arch = [int(delta)] * len(CHANNELS)
    if mode in ("conventional", "fused", "fused_consuming", "memcnn"):
        model = iUNet(channels=CHANNELS, architecture=arch, dim=2, verbose=0,
                      disable_custom_gradient=mode == "conventional",
                      me_backend="memcnn" if mode == "memcnn" else "fused",
                      consume_output=mode == "fused_consuming")
    elif mode in ("unet", "unet_checkpoint"):
        model = UNet(channels=CHANNELS, architecture=arch, dim=2,
                     checkpoint_levels=mode == "unet_checkpoint")
    elif mode == "iunets":
        from iunet_nb.engine.memcnn import import_memcnn

        import_memcnn()  # before iunets: memcnn's import would disable UserWarnings
        import iunets

        model = iunets.iUNet(in_channels=CHANNELS[0], architecture=arch, dim=2)
    else:
        raise ValueError(f"mode must be one of {ALL_MODES}, got {mode!r}")
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device)


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def predicted_total(mode: str, size: int, delta: int, dtype: str = "float32") -> int | None:
    """Predicted total bytes of a configuration (memcnn's for the reference package; None
    for the :data:`UNPREDICTED_MODES`)."""
    pred = _predicted(mode, size, delta, dtype)
    return None if pred is None else pred.total


def _predicted(mode: str, size: int, delta: int, dtype: str = "float32"):
    """The :class:`~iunet_nb.measure.predict.MemoryPrediction` of a Table 1 configuration
    (None for the :data:`UNPREDICTED_MODES`)."""
    from iunet_nb.arch.layout import compute_layout

    if mode in UNPREDICTED_MODES:
        return None
    from iunet_nb.measure.predict import predict_step_memory

    layout = compute_layout(CHANNELS, [delta] * len(CHANNELS), 2)
    pmode = "memcnn" if mode == "iunets" else mode
    return predict_step_memory(layout, (1, CHANNELS[0], size, size), dtype, pmode)


def _peak_level(mode: str, size: int, delta: int) -> int | None:
    """Level at which the predictor places the step peak (None if unknown)."""
    pred = _predicted(mode, size, delta)
    where = "" if pred is None else pred.details.get("peak_at", "")
    m = re.match(r"[A-Z](\d+)\.", where)
    return int(m.group(1)) if m else None


def _predicted_overhead(mode: str, size: int, delta: int) -> float | None:
    pred = _predicted(mode, size, delta)
    return None if pred is None else pred.overhead_tensors


def optimizer_label(optimizer: str = "none", in_backward: bool = False) -> str:
    """The CSV's ``optimizer`` value: ``none``, ``sgd``, ``adamw``, ``sgd-in-backward``, ..."""
    if optimizer not in OPTIMIZER_CHOICES:
        raise ValueError(f"optimizer={optimizer!r}: use one of {OPTIMIZER_CHOICES}")
    if in_backward and optimizer == "none":
        raise ValueError("--optimizer-in-backward needs --optimizer sgd or adamw")
    return optimizer + ("-in-backward" if in_backward else "")


def make_optimizer(model: Any, optimizer: str = "none", in_backward: bool = False):
    """``(optimizer for measure_step/time_step or None, in-backward handle or None)``."""
    import torch

    optimizer_label(optimizer, in_backward)
    if optimizer == "none":
        return None, None
    kwargs = OPTIMIZER_KWARGS[optimizer]
    if in_backward:
        from iunet_nb.engine.optim_in_backward import optimizer_in_backward

        return None, optimizer_in_backward(model, optimizer, **kwargs)
    cls = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[optimizer]
    return cls(model.parameters(), **kwargs), None


def measure_config(mode: str, size: int, delta: int, *, dtype: str = "float32",
                   device: str = "cpu", threads: int = 1, repeats: int = 2,
                   seed: int = 0, optimizer: str = "none", in_backward: bool = False,
                   loss: str = "mean_square") -> dict:
    """Measure one configuration in this process (use :func:`run_config` for a fresh one).

    The first step is measured with :func:`measure_step` (it doubles as the
    warm-up), then ``repeats`` steps are timed with :func:`time_step`;
    ``seconds`` is the fastest of them (the least disturbed by other load on
    the machine), ``seconds_all`` lists all.  With ``optimizer`` the update is
    part of every step (``in_backward``: applied per parameter during the
    backward, :mod:`iunet_nb.engine.optim_in_backward`), and the measured step is the
    second one, in the steady state of a training loop: the optimizer's state
    (``state_bytes``, e.g. Adam's two moments) exists before it and stays
    resident throughout, so total = parameters + optimizer state + input +
    step peak.  ``loss``: one of :data:`LOSS_CHOICES`.
    """
    import torch

    from iunet_nb.measure.meter import measure_step, optimizer_state_bytes, time_step

    loss_fn = _loss_fn(loss)

    torch.set_num_threads(int(threads))
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but CUDA is not available")
    label = optimizer_label(optimizer, in_backward)
    tdtype = _torch_dtype(dtype)
    model = build_model(mode, delta, dtype=tdtype, device=device, seed=seed)
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, CHANNELS[0], size, size, generator=gen).to(device=device, dtype=tdtype)
    opt, inb = make_optimizer(model, optimizer, in_backward)
    if label != "none":  # a first step creates the optimizer state: measure the steady state
        time_step(model, x, loss_fn, repeats=0, warmup=1, optimizer=opt)
    m = measure_step(model, x, loss_fn, optimizer=opt)
    state = optimizer_state_bytes(opt if inb is None else inb)
    activation = m.activation_bytes
    times = (time_step(model, x, loss_fn, repeats=repeats, warmup=0, optimizer=opt) if repeats > 0
             else [m.seconds])
    if inb is not None:
        inb.remove()
    tensor = x.nbytes
    return dict(optimizer=label, state_bytes=state,
        mode=mode, size=size, delta=delta, dtype=dtype, device=str(m.device), threads=threads,
        status="ok", parameters=params, param_bytes=m.param_bytes, input_bytes=m.input_bytes,
        grad_bytes=m.grad_bytes, activation_bytes=activation, peak_bytes=m.peak_bytes,
        total_bytes=m.total_bytes + state, total_gib=(m.total_bytes + state) / GiB,
        overhead_tensors=activation / tensor, seconds=min(times),
        seconds_all=" ".join(f"{t:.4f}" for t in times), message="", loss=loss,
    )


def run_config(mode: str, size: int, delta: int, *, dtype: str = "float32", device: str = "cpu",
               threads: int = 1, repeats: int = 2, timeout: float = 1800.0,
               optimizer: str = "none", in_backward: bool = False, loss: str = "mean_square") -> dict:
    """Measure one configuration in a fresh subprocess; returns the row (status 'error' on failure)."""
    cmd = [sys.executable, "-m", "iunet_nb.measure.bench", "_one", "--json", "--mode", mode,
           "--size", str(size), "--delta", str(delta), "--dtype", dtype, "--device", device,
           "--threads", str(threads), "--repeats", str(repeats), "--optimizer", optimizer,
           "--loss", loss]
    if in_backward:
        cmd.append("--optimizer-in-backward")
    label = optimizer_label(optimizer, in_backward)
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)  # makes steps 2-3x slower: never time with it
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(_failed_row(mode, size, delta, dtype, device, threads,
                                f"timed out after {timeout:.0f} s", optimizer=label), loss=loss)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        msg = tail[-1] if tail else f"exit code {proc.returncode}"
        if proc.returncode < 0 or proc.returncode == 137:
            msg = f"killed (signal {-proc.returncode if proc.returncode < 0 else 9}; out of memory?)"
        return dict(_failed_row(mode, size, delta, dtype, device, threads, msg, optimizer=label), loss=loss)
    return dict(json.loads(lines[-1]), loss=loss)


def _failed_row(mode, size, delta, dtype, device, threads, message, status="error",
                optimizer="none") -> dict:
    return dict(mode=mode, size=size, delta=delta, dtype=dtype, device=device, threads=threads,
                status=status, message=message, optimizer=optimizer)


# ----------------------------------------------------------------------------- paper
def load_paper_table(path: str | Path | None = None) -> list[dict]:
    """The paper's Table 1 as a list of dicts (delta, me_gb, conventional_gb, ratio_percent,
    me_s, conventional_s, runtime_ratio_percent, source); ``#`` lines are comments."""
    path = Path(path) if path is not None else PAPER_CSV
    with open(path, newline="") as f:
        rows = list(csv.DictReader(line for line in f if not line.lstrip().startswith("#")))
    out = []
    for r in rows:
        d = {k: (r[k] if k == "source" else float(r[k])) for k in r}
        d["delta"] = int(d["delta"])
        out.append(d)
    return out


# ----------------------------------------------------------------------------- results
def read_results(path: str | Path) -> list[dict]:
    """Rows of a table1 CSV with numbers converted."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    ints = {"size", "delta", "threads", "parameters", "param_bytes", "input_bytes", "grad_bytes",
            "activation_bytes", "peak_bytes", "total_bytes", "predicted_total_bytes", "state_bytes"}
    floats = {"total_gib", "overhead_tensors", "seconds", "prediction_error"}
    for r in rows:
        for k in list(r):
            if r[k] in ("", None):
                r[k] = None
            elif k in ints:
                r[k] = int(float(r[k]))
            elif k in floats:
                r[k] = float(r[k])
    return rows


def _fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def summarize(rows: Sequence[dict], paper: Sequence[dict] | None = None,
              target_size: int = PAPER_SIZE) -> dict:
    """Ratios, overheads, the 512 x 512 extrapolation and the targets check.

    Returns a dict with ``sizes``, ``deltas``, ``modes``, ``cell[(mode, size, delta)]`` (the
    ok rows), ``memory_ratio[(mode, size, delta)]`` (total / conventional total),
    ``runtime_ratio[...]``, ``extrapolated[(mode, delta)]`` (bytes at ``target_size``; a
    measured row at that size is used as is), ``overhead_512[(mode, delta)]`` (activations
    at ``target_size`` in input tensors) and ``targets`` (list of dicts with name,
    passed, value, limit, gap, detail).
    """
    paper = list(paper) if paper is not None else load_paper_table()
    # Table 1 proper: steps without an optimizer (rows with one are reported separately)
    ok = [r for r in rows if r.get("status") == "ok" and _plain(r)]
    cell = {(r["mode"], r["size"], r["delta"]): r for r in ok}
    sizes = sorted({r["size"] for r in ok})
    deltas = sorted({r["delta"] for r in ok})
    modes = [m for m in ALL_MODES if any(r["mode"] == m for r in ok)]
    mem_ratio, run_ratio = _ratios_to_conventional(cell)
    extrap, act512, fits, unreliable = {}, {}, {}, {}
    for mode in modes:
        for delta in deltas:
            pts = [(sz, cell[(mode, sz, delta)]) for sz in sizes if (mode, sz, delta) in cell]
            estimate = _estimate_at(pts, mode, delta, target_size)
            if estimate is None:
                continue
            extrap[(mode, delta)], act512[(mode, delta)], fits[(mode, delta)], why = estimate
            if why:
                unreliable[(mode, delta)] = why
    summary = dict(sizes=sizes, deltas=deltas, modes=modes, cell=cell, memory_ratio=mem_ratio,
                   runtime_ratio=run_ratio, extrapolated=extrap, overhead_512=act512, fits=fits,
                   unreliable=unreliable,
                   predicted={(m, d): predicted_total(m, target_size, d) for m in modes for d in deltas},
                   predicted_overhead={(m, d): _predicted_overhead(m, target_size, d)
                                       for m in modes for d in deltas},
                   paper={p["delta"]: p for p in paper}, target_size=target_size)
    summary["targets"] = _targets(summary)
    return summary


def step_times(row: dict) -> list[float]:
    """The timed steps of a result row (``seconds_all``), or its ``seconds`` alone if not recorded."""
    text = row.get("seconds_all") or ""
    times = [float(t) for t in str(text).split()]
    return times or ([float(row["seconds"])] if row.get("seconds") else [])


def median_step_seconds(row: dict) -> float | None:
    """The median of the row's timed steps (None without any)."""
    times = step_times(row)
    return statistics.median(times) if times else None


def _ratios_to_conventional(cell: dict) -> tuple[dict, dict]:
    """``(memory, runtime)``: each row's total and median step time / the conventional row's."""
    mem_ratio, run_ratio = {}, {}
    for (mode, size, delta), r in cell.items():
        conv = cell.get(("conventional", size, delta))
        if conv:
            mem_ratio[(mode, size, delta)] = r["total_bytes"] / conv["total_bytes"]
            conv_s, row_s = median_step_seconds(conv), median_step_seconds(r)
            if conv_s and row_s:
                run_ratio[(mode, size, delta)] = row_s / conv_s
    return mem_ratio, run_ratio


def _estimate_at(pts: list[tuple[int, dict]], mode: str, delta: int, target_size: int
                 ) -> tuple[float, float, str, str] | None:
    """Total bytes and activation overhead (input tensors) at ``target_size`` from the rows ``pts``.

    ``pts`` are ``(size, row)`` of one mode and delta.  Returns ``(total, overhead, how, why)``:
    ``how`` is ``'measured'`` (a row at ``target_size``) or ``'fit a/b'`` (``a + b * H * W``
    through the two largest sizes below it), ``why`` is non-empty where the fit is not valid;
    ``None`` without a row at ``target_size`` or two below it.
    """
    tensor = CHANNELS[0] * target_size * target_size * 4
    direct = [r for sz, r in pts if sz == target_size]
    if direct:
        return direct[0]["total_bytes"], direct[0]["activation_bytes"] / tensor, "measured", ""
    pts = [(sz, r) for sz, r in pts if sz < target_size][-2:]  # the two largest sizes
    if len(pts) < 2:
        return None
    xs = [sz * sz for sz, _ in pts]
    a, b = _fit_line(xs, [r["total_bytes"] for _, r in pts])
    aa, bb = _fit_line(xs, [r["activation_bytes"] for _, r in pts])
    # The fit assumes the step peaks at the same place at every size.  At small
    # sizes the peak sits late in the backward (gradients, weight temporaries of
    # the coarse levels), at 512^2 early (full-resolution activations): then the
    # affine fit is not valid and the predictor's figure is the better estimate.
    where = [_peak_level(mode, sz, delta) for sz in (pts[0][0], pts[1][0], target_size)]
    why = ""
    if None not in where and len(set(where)) > 1:
        why = (f"peak moves (level {where[0]} at {pts[0][0]}^2, {where[1]} at {pts[1][0]}^2, "
               f"{where[2]} at {target_size}^2)")
    return (a + b * target_size**2, (aa + bb * target_size**2) / tensor,
            f"fit {pts[0][0]}/{pts[1][0]}", why)


def _plain(row: dict) -> bool:
    """Whether a row is a Table-1 step: no optimizer, the meter's loss (older CSVs have neither column)."""
    return row.get("optimizer") in (None, "", "none") and row.get("loss") in (None, "", "mean_square")


def _loss_fn(loss: str):
    """The loss function of ``--losses`` choice ``loss`` (None: the meter's default)."""
    if loss not in LOSS_CHOICES:
        raise ValueError(f"--losses {loss!r}: use one of {LOSS_CHOICES}")
    if loss == "mean_square":
        return None
    return lambda y: y.float().square().mean()


def loss_rows(rows: Sequence[dict]) -> list[dict]:
    """The ok rows timed with a loss other than the meter's, without optimizer."""
    return [r for r in rows if r.get("status") == "ok" and r.get("loss") not in (None, "", "mean_square")
            and r.get("optimizer") in (None, "", "none")]


def format_loss_section(rows: Sequence[dict]) -> list[str]:
    """Runtime per loss, side by side: each mode's median step over conventional's with the same loss."""
    other = loss_rows(rows)
    if not other:
        return []
    ok = [r for r in rows if r.get("status") == "ok" and r.get("optimizer") in (None, "", "none")]
    by = {(r.get("loss") or "mean_square", r["mode"], r["size"], r["delta"]): r for r in ok}
    losses = [l for l in LOSS_CHOICES if any((r.get("loss") or "mean_square") == l for r in ok)]
    lines = ["", "Step time by loss (median step s, and / conventional with the same loss):"]
    hdr = f"{'size':>5} {'delta':>5} {'mode':<16} " + " ".join(f"{l + ' s':>14} {'/conv':>6}" for l in losses)
    lines += [hdr, "-" * len(hdr)]
    keys = sorted({(r["size"], r["delta"], r["mode"]) for r in ok},
                  key=lambda k: (k[0], k[1], ALL_MODES.index(k[2])))
    for size, delta, mode in keys:
        cells = []
        for l in losses:
            r, c = by.get((l, mode, size, delta)), by.get((l, "conventional", size, delta))
            t, tc = (median_step_seconds(r) if r else None), (median_step_seconds(c) if c else None)
            cells.append(f"{(f'{t:.3f}' if t else '-'):>14} {(f'{t / tc:.3f}' if t and tc else '-'):>6}")
        lines.append(f"{size:>5} {delta:>5} {mode:<16} " + " ".join(cells))
    return lines


#: the target of the optimizer in the backward: fused + SGD in the backward at 512^2, delta=30
OPTIMIZER_TARGET = dict(mode="fused", optimizer="sgd-in-backward", size=512, delta=30, limit_gib=1.05)


def optimizer_rows(rows: Sequence[dict]) -> list[dict]:
    """The ok rows of steps with an optimizer, sorted by size, delta, mode, optimizer."""
    out = [r for r in rows if r.get("status") == "ok" and r.get("optimizer") not in (None, "", "none")]
    return sorted(out, key=lambda r: (r["size"], r["delta"], ALL_MODES.index(r["mode"]),
                                      str(r["optimizer"])))


def format_optimizer_section(rows: Sequence[dict]) -> list[str]:
    """Lines of the report for steps that include the optimizer (empty if there are none)."""
    opt = optimizer_rows(rows)
    if not opt:
        return []
    plain = {(r["mode"], r["size"], r["delta"]): r for r in rows if r.get("status") == "ok" and _plain(r)}
    lines = ["", "Training step including the optimizer, in the steady state of a training loop (total = "
             "parameters + optimizer state + input + step peak of the second step):"]
    hdr = (f"{'size':>5} {'delta':>5} {'mode':<15} {'optimizer':<18} {'total GiB':>9} {'state GiB':>9} "
           f"{'grads GiB':>9} {'act. T':>7} {'median s':>8} {'no-opt GiB':>10}")
    lines += [hdr, "-" * len(hdr)]
    for r in opt:
        base = plain.get((r["mode"], r["size"], r["delta"]))
        lines.append(
            f"{r['size']:>5} {r['delta']:>5} {r['mode']:<15} {r['optimizer']:<18} {r['total_gib']:>9.3f} "
            f"{(r.get('state_bytes') or 0) / GiB:>9.3f} {r['grad_bytes'] / GiB:>9.3f} "
            f"{r['overhead_tensors']:>7.2f} {median_step_seconds(r) or 0:>8.2f} "
            f"{(format(base['total_gib'], '.3f') if base else '-'):>10}")
    t = OPTIMIZER_TARGET
    hit = [r for r in opt if (r["mode"], r["optimizer"], r["size"], r["delta"]) ==
           (t["mode"], t["optimizer"], t["size"], t["delta"])]
    if hit:
        v = hit[0]["total_gib"]
        lines.append(f"  [{'PASS' if v <= t['limit_gib'] else 'FAIL'}] fused + SGD in the backward at "
                     f"{t['size']}^2, delta={t['delta']}: {v:.3f} GiB (limit {t['limit_gib']:.2f} GiB; "
                     f"the paper's ME figure without any optimizer: 2.06 GB)")
    return lines


def estimate_512(s: dict, mode: str, delta: int) -> tuple[float | None, str]:
    """Best estimate of the total at the target size and where it comes from: a measured row,
    the affine fit, or (where the fit is not valid, see ``unreliable``) the predictor."""
    fit = s["extrapolated"].get((mode, delta))
    how = s["fits"].get((mode, delta))
    if how == "measured":
        return fit, "measured"
    if fit is not None and (mode, delta) not in s["unreliable"]:
        return fit, how
    pred = s["predicted"].get((mode, delta))
    return pred, "predictor"


def _overhead_512(s: dict, mode: str, delta: int) -> tuple[float | None, str]:
    how = s["fits"].get((mode, delta))
    if how == "measured" or ((mode, delta) in s["overhead_512"] and (mode, delta) not in s["unreliable"]):
        return s["overhead_512"][(mode, delta)], how
    return s["predicted_overhead"].get((mode, delta)), "predictor"


def _consuming_targets(s: dict) -> list[dict]:
    """The consuming mode's overhead target, worst over delta at each measured size."""
    limit = TARGETS["consuming_overhead_tensors"]
    out = []
    for size in s["sizes"]:
        over = [(d, s["cell"][("fused_consuming", size, d)]["overhead_tensors"]) for d in s["deltas"]
                if ("fused_consuming", size, d) in s["cell"]]
        if over:
            worst = max(v for _, v in over)
            out.append(dict(name=f"fused_consuming overhead <= {limit:g} tensor-equivalents at {size}^2",
                            value=worst, limit=limit, passed=worst <= limit, unit="T",
                            detail="per delta: " + ", ".join(f"d={d}: {v:.2f}" for d, v in over)))
    return out


def _targets(s: dict) -> list[dict]:
    out = _fused_targets(s) + _strict_targets(s) + _consuming_targets(s)
    for t in out:
        t["gap"] = t["value"] - t["limit"]
    return out


def _fused_targets(s: dict) -> list[dict]:
    out: list[dict] = []
    cell, deltas, sizes = s["cell"], s["deltas"], s["sizes"]
    if "fused" not in s["modes"]:
        return out
    big = max(sz for sz in sizes if ("fused", sz, deltas[0]) in cell)
    fused_over = [cell[("fused", big, d)]["overhead_tensors"] for d in deltas if ("fused", big, d) in cell]
    est = [(d,) + _overhead_512(s, "fused", d) for d in deltas]
    est_txt = ", ".join(f"{v:.2f}{'p' if how == 'predictor' else ''}" for _, v, how in est if v is not None)
    where = f"{big}^2" + ("" if big == s["target_size"] else " (largest measured size)")
    if len(fused_over) >= 2:
        spread = (max(fused_over) - min(fused_over)) / (sum(fused_over) / len(fused_over))
        out.append(dict(name="fused overhead constant in delta", value=spread,
                        limit=TARGETS["overhead_spread"], passed=spread <= TARGETS["overhead_spread"],
                        detail=f"(max-min)/mean of activation overhead over delta at {where}: "
                               f"{', '.join(f'{v:.2f}' for v in fused_over)} tensors", unit="%"))
    if fused_over:
        worst = max(fused_over)
        out.append(dict(name="fused overhead <= 5 tensor-equivalents", value=worst,
                        limit=TARGETS["overhead_tensors"], passed=worst <= TARGETS["overhead_tensors"],
                        detail=f"worst over delta at {where}; estimate at {s['target_size']}^2 "
                               f"('p' = predictor): {est_txt}", unit="T"))
    fr, srcs = [], set()
    for d in deltas:
        p = s["paper"].get(d)
        v, how = estimate_512(s, "fused", d)
        if p and v is not None:
            fr.append((d, v / GiB / p["me_gb"]))
            srcs.add(how)
    if fr:
        worst = max(v for _, v in fr)
        out.append(dict(name="fused 512^2 total <= 0.85 x paper ME", value=worst,
                        limit=TARGETS["paper_fraction"], passed=worst <= TARGETS["paper_fraction"],
                        detail="fused / paper ME per delta: " + ", ".join(f"d={d}: {v:.2f}" for d, v in fr)
                               + f" ({', '.join(sorted(srcs))})",
                        unit="x"))
    rr = [(d, s["runtime_ratio"][("fused", big, d)]) for d in deltas if ("fused", big, d) in s["runtime_ratio"]]
    if rr:
        worst = max(v for _, v in rr)
        out.append(dict(name="fused runtime <= 1.40 x conventional", value=worst,
                        limit=TARGETS["runtime_ratio"], passed=worst <= TARGETS["runtime_ratio"],
                        detail=f"at {big}^2: " + ", ".join(f"d={d}: {v:.2f}" for d, v in rr), unit="x"))
    dmax = max(deltas)
    (fv, fhow), (cv, chow) = estimate_512(s, "fused", dmax), estimate_512(s, "conventional", dmax)
    if fv is not None and cv is not None and ("conventional", dmax) in s["predicted"]:
        v = fv / cv
        out.append(dict(name=f"fused <= 15 % of conventional at delta={dmax}, {s['target_size']}^2",
                        value=v, limit=TARGETS["memory_ratio_512"], passed=v <= TARGETS["memory_ratio_512"],
                        detail=f"(fused: {fhow}, conventional: {chow}; the paper's target is delta=30)",
                        unit="%"))
    return out


def _worst_target(name: str, values: list[tuple[int, int, float]], limit: float, unit: str,
                  what: str) -> dict:
    """A target met when every ``(size, delta, value)`` is ``<= limit``; reports the worst."""
    worst = max(v for _, _, v in values)
    detail = what + ": " + ", ".join(f"{size}^2 d={d}: {v:.2f}" for size, d, v in values)
    return dict(name=name, value=worst, limit=limit, passed=worst <= limit, detail=detail, unit=unit)


def _strict_targets(s: dict) -> list[dict]:
    """Overhead <= 3.5 T from 256^2, runtime <= 1.35x conventional and >= 1.3x faster than iunets
    from 128^2, at every measured delta (median step times)."""
    cell, rr, out = s["cell"], s["runtime_ratio"], []
    keys = sorted(k for k in cell if k[0] == "fused")
    over = [(size, d, cell[(m, size, d)]["overhead_tensors"]) for m, size, d in keys
            if size >= LARGE_OVERHEAD_MIN_SIZE]
    if over:
        out.append(_worst_target("fused overhead <= 3.5 tensor-equivalents", over,
                                 TARGETS["large_overhead_tensors"], "T", "per size and delta"))
    speed = [(size, d, rr[(m, size, d)]) for m, size, d in keys
             if size >= SPEED_MIN_SIZE and (m, size, d) in rr]
    if speed:
        out.append(_worst_target("fused runtime <= 1.35 x conventional at every size", speed,
                                 TARGETS["runtime_ratio_every_size"], "x", "median step / conventional's"))
    vs = []
    for mode, size, d in keys:
        ref = cell.get(("iunets", size, d))
        if size < SPEED_MIN_SIZE or ref is None:
            continue
        fused_s, ref_s = median_step_seconds(cell[(mode, size, d)]), median_step_seconds(ref)
        if fused_s and ref_s:
            vs.append((size, d, fused_s / ref_s))
    if vs:
        out.append(_worst_target("fused step <= 0.77 x iunets' (>= 1.3x faster)", vs,
                                 TARGETS["time_vs_iunets"], "x", "median step / iunets 0.1's"))
    return out


def _fmt_target(t: dict) -> str:
    unit = t["unit"]

    def f(v: float) -> str:
        if unit == "%":
            return f"{100 * v:.1f} %"
        if unit == "T":
            return f"{v:.2f} T"
        return f"{v:.2f}x"

    status = "PASS" if t["passed"] else "FAIL"
    gap = t["gap"]
    gap_s = f"{100 * gap:+.1f} pp" if unit == "%" else (f"{gap:+.2f} T" if unit == "T" else f"{gap:+.2f}x")
    return f"  [{status}] {t['name']}: {f(t['value'])} (limit {f(t['limit'])}, gap {gap_s}) -- {t['detail']}"


def format_report(rows: Sequence[dict], summary: dict | None = None) -> str:
    """The printed table: measured GiB, ratios, runtimes, overheads, 512^2 extrapolation, targets."""
    s = summary or summarize(rows)
    lines = _measured_lines(rows, s) + [""] + _estimate_lines(s) + [""] + _runtime_lines(s) + [""]
    lines.append("Targets (fused engine):")
    lines += [_fmt_target(t) for t in s["targets"]] or ["  (need the fused and conventional modes)"]
    return "\n".join(lines + format_optimizer_section(rows) + format_loss_section(rows))


def _measured_lines(rows: Sequence[dict], s: dict) -> list[str]:
    """The measured rows (GiB, ratios to conventional, runtime, overhead, prediction) and the failed ones."""
    lines = ["Table 1 re-measured: iUNet 64ch 2D, 4 downsamplings (64..1024 channels), batch 1; "
             "total = parameters + input + step peak (GiB)"]
    hdr = f"{'size':>5} {'delta':>5} {'mode':<16} {'total GiB':>9} {'/conv':>7} {'median s':>8} {'/conv':>7} " \
          f"{'act. T':>7} {'pred GiB':>9} {'err':>6}"
    lines += [hdr, "-" * len(hdr)]
    for size in s["sizes"]:
        for delta in s["deltas"]:
            for mode in s["modes"]:
                r = s["cell"].get((mode, size, delta))
                if not r:
                    continue
                mr = s["memory_ratio"].get((mode, size, delta))
                rr = s["runtime_ratio"].get((mode, size, delta))
                pred = r.get("predicted_total_bytes")
                err = r.get("prediction_error")
                lines.append(
                    f"{size:>5} {delta:>5} {mode:<16} {r['total_gib']:>9.3f} "
                    f"{(f'{100 * mr:.1f}%' if mr is not None else '-'):>7} {median_step_seconds(r) or 0:>8.3f} "
                    f"{(f'{100 * rr:.0f}%' if rr is not None else '-'):>7} {r['overhead_tensors']:>7.2f} "
                    f"{(f'{pred / GiB:.3f}' if pred else '-'):>9} "
                    f"{(f'{100 * err:+.1f}%' if err is not None else '-'):>6}")
    for r in rows:
        if r.get("status") != "ok":
            mode = r["mode"] + ("" if _plain(r) else f"+{r['optimizer']}")
            lines.append(f"{r['size']:>5} {r['delta']:>5} {mode:<16} {r['status'].upper()}: {r.get('message', '')}")
    lines.append("'/conv': ratio to the conventional iUNet of the same size and delta; 'act. T': "
                 "activation bytes (step peak - gradients) / bytes of one 64xHxW input tensor (in the run's dtype)")
    return lines


def _estimate_lines(s: dict) -> list[str]:
    """The estimates at the target size (fit / predictor) beside the paper's Table 1, and the overheads."""
    ts = s["target_size"]
    lines = [f"Estimate at {ts}x{ts}: a + b*H*W fitted through the two largest sizes ('fit'; '*' = not "
             "valid, the peak moves to another level) and the predictor ('pred'), GiB, beside the "
             "paper's Table 1 (GPU; its 'GB' read as GiB)"]
    me_modes = [m for m in s["modes"] if m in ME_MODES]
    hdr = f"{'delta':>5} " + " ".join(f"{m[:15]:>15}" for m in s["modes"]) + \
          f" {'paper ME':>9} {'paper conv':>10} " + " ".join(f"{m + '/conv':>12}" for m in me_modes) + \
          f" {'paper ratio':>11}"
    lines += [hdr, f"{'':>5} " + " ".join(f"{'fit / pred':>15}" for _ in s["modes"]), "-" * len(hdr)]
    for delta in s["deltas"]:
        p = s["paper"].get(delta)
        vals = []
        for m in s["modes"]:
            v = s["extrapolated"].get((m, delta))
            pr = s["predicted"].get((m, delta))
            star = "*" if (m, delta) in s["unreliable"] else ("=" if s["fits"].get((m, delta)) == "measured" else " ")
            fit_s = f"{v / GiB:.2f}{star}" if v is not None else "-"
            vals.append(f"{fit_s + ' / ' + (f'{pr / GiB:.2f}' if pr else '-'):>15}")
        conv, _ = estimate_512(s, "conventional", delta)
        ratios = []
        for m in me_modes:
            v, _ = estimate_512(s, m, delta)
            ratios.append(f"{100 * v / conv:>11.1f}%" if v is not None and conv else f"{'-':>12}")
        lines.append(f"{delta:>5} " + " ".join(vals) +
                     (f" {p['me_gb']:>5.2f} GiB {p['conventional_gb']:>6.2f} GiB " if p else f" {'-':>9} {'-':>10} ")
                     + " ".join(ratios) + (f" {p['ratio_percent']:>10.1f}%" if p else f" {'-':>11}"))
    lines.append("ratios use the best estimate: a measured row ('='), else the fit where valid, else the "
                 "predictor")
    lines += [f"  * {m} delta={d}: {why}" for (m, d), why in sorted(s["unreliable"].items())
              if m in ("conventional", "fused")]
    if s["overhead_512"]:
        parts = []
        for m in me_modes:
            vals = [_overhead_512(s, m, d) for d in s["deltas"]]
            parts.append(f"{m}: " + ", ".join(f"{v:.2f}{'p' if how == 'predictor' else ''}" for v, how in vals
                                               if v is not None))
        lines.append(f"activation overhead at {ts}^2 in input tensors ('p' = predictor): " + "; ".join(parts))
    return lines


def _runtime_lines(s: dict) -> list[str]:
    """Seconds per training step of every mode, the ratio to conventional and the paper's."""
    lines = ["Runtime per training step (median of the timed steps, s, with their min-max) and ratio of the "
             "medians to conventional, beside the paper's (GPU, 512x512):"]
    for size in s["sizes"]:
        for delta in s["deltas"]:
            parts = []
            for m in s["modes"]:
                r = s["cell"].get((m, size, delta))
                rr = s["runtime_ratio"].get((m, size, delta))
                times = step_times(r) if r else []
                if times:
                    spread = f" [{min(times):.3f}-{max(times):.3f}]" if len(times) > 1 else ""
                    parts.append(f"{m} {statistics.median(times):.3f}s{spread}"
                                 + (f" ({100 * rr:.0f}%)" if rr and m != "conventional" else ""))
            p = s["paper"].get(delta)
            ptxt = f" | paper: ME {p['me_s']:.2f}s conv {p['conventional_s']:.2f}s ({p['runtime_ratio_percent']:.0f}%)" if p else ""
            if parts:
                lines.append(f"  {size}^2 d={delta}: " + ", ".join(parts) + ptxt)
    return lines


def plot_results(rows: Sequence[dict], path: str | Path, summary: dict | None = None) -> Path:
    """PNG: total memory vs delta per mode and size (+512^2 extrapolation, paper markers);
    runtime ratio vs delta (+paper and the runtime targets the report checks)."""
    # The Figure API draws without pyplot, so no backend is switched (a notebook keeps its own).
    from matplotlib.figure import Figure

    s = summary or summarize(rows)
    fig = Figure(figsize=(12, 4.8))
    ax1, ax2 = fig.subplots(1, 2)
    colors = {m: f"C{i}" for i, m in enumerate(ALL_MODES)}
    styles = ["-", "--", "-.", ":"]
    for k, size in enumerate(s["sizes"]):
        for m in s["modes"]:
            pts = [(d, s["cell"][(m, size, d)]["total_gib"]) for d in s["deltas"] if (m, size, d) in s["cell"]]
            if pts:
                ax1.plot(*zip(*pts), styles[k % len(styles)], marker="o", ms=3, color=colors[m],
                         label=f"{m} {size}²")
    ts = s["target_size"]
    for m in s["modes"]:
        pts = [(d, estimate_512(s, m, d)[0] / GiB) for d in s["deltas"] if estimate_512(s, m, d)[0]]
        if pts:
            ax1.plot(*zip(*pts), "s", ms=6, mfc="none", color=colors[m], label=f"{m} {ts}² (estimate)")
    pd = sorted(s["paper"])
    ax1.plot(pd, [s["paper"][d]["me_gb"] for d in pd], "k*", ms=10, label="paper ME (512², GPU)")
    ax1.plot(pd, [s["paper"][d]["conventional_gb"] for d in pd], "kx", ms=9, label="paper conv. (512², GPU)")
    ax1.set_yscale("log")
    ax1.set_xlabel("δ (coupling layers per block)")
    ax1.set_ylabel("peak memory of a training step (GiB, log scale)")
    ax1.set_title("Memory: parameters + input + step peak")
    ax1.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    ax1.grid(alpha=0.3)
    for k, size in enumerate(s["sizes"]):
        for m in s["modes"]:
            if m == "conventional":
                continue
            pts = [(d, 100 * s["runtime_ratio"][(m, size, d)]) for d in s["deltas"]
                   if (m, size, d) in s["runtime_ratio"]]
            if pts:
                ax2.plot(*zip(*pts), styles[k % len(styles)], marker="o", ms=3, color=colors[m],
                         label=f"{m} {size}²")
    ax2.plot(pd, [s["paper"][d]["runtime_ratio_percent"] for d in pd], "k*", ms=10, label="paper ME/conv.")
    # The runtime targets the report checks (:func:`_fused_targets`, :func:`_strict_targets`), for
    # the fused mode: <= runtime_ratio_every_size x conventional at every size from SPEED_MIN_SIZE
    # (stricter than runtime_ratio at the largest size, drawn only where no size reaches it) ...
    fused_sizes = sorted({size for m, size, _ in s["runtime_ratio"] if m == "fused"})
    strict = [size for size in fused_sizes if size >= SPEED_MIN_SIZE]
    if strict:
        ax2.axhline(100 * TARGETS["runtime_ratio_every_size"], color="grey", ls=":", lw=1.5,
                    label=f"target: fused ≤ {100 * TARGETS['runtime_ratio_every_size']:.0f} % "
                          f"at every size ≥ {SPEED_MIN_SIZE}²")
    elif fused_sizes:
        ax2.axhline(100 * TARGETS["runtime_ratio"], color="grey", ls=":", lw=1.5,
                    label=f"target: fused ≤ {100 * TARGETS['runtime_ratio']:.0f} % at {fused_sizes[-1]}²")
    # ... and step <= time_vs_iunets x iunets' of the same size and delta: on this axis (percent of
    # conventional, the same denominator) the limit is that fraction of iunets' ratio, per point.
    for size in strict:
        pts = [(d, 100 * TARGETS["time_vs_iunets"] * s["runtime_ratio"][("iunets", size, d)])
               for d in s["deltas"] if ("iunets", size, d) in s["runtime_ratio"]]
        if pts:
            ax2.plot(*zip(*pts), styles[s["sizes"].index(size) % len(styles)], marker="v", ms=6,
                     mfc="none", lw=0.8, color="k",
                     label=f"target: fused ≤ {TARGETS['time_vs_iunets']:.2f} × iunets' step, {size}²")
    ax2.set_xlabel("δ (coupling layers per block)")
    ax2.set_ylabel("median step time / conventional iUNet (%)")
    ax2.set_title("Runtime ratio (one thread)" if s["sizes"] else "Runtime ratio")
    ax2.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # legends sit below the axes
    return path


# ----------------------------------------------------------------------------- the run
@dataclass
class Table1Run:
    """What :func:`run_table1` produced."""

    rows: list[dict]
    csv_path: Path
    latest_path: Path
    png_path: Path | None
    summary: dict
    report: str
    messages: list[str] = field(default_factory=list)


def _write_csv_atomic(path: Path, rows: Sequence[dict], columns: Sequence[str] = CSV_COLUMNS) -> None:
    """Write ``rows`` to ``path`` atomically (:func:`iunet_nb.common.write_bytes_atomically`): the
    file is either absent or a complete CSV, at every moment (an interrupted run keeps what it measured)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomically(path, text.getvalue().encode())


def _check_positive_ints(name: str, values: Iterable[Any], minimum: int = 1) -> list[int]:
    values = list(values)
    if not values:
        raise ValueError(f"{name}: give at least one value")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < minimum]
    if bad:
        raise ValueError(f"{name}: every value must be an integer >= {minimum}, got {bad}")
    return [int(v) for v in values]


def check_modes(modes: Iterable[str], valid: Sequence[str]) -> list[str]:
    """``--modes``: at least one, each one of ``valid`` (``ValueError`` naming the option)."""
    modes = list(modes)
    if not modes:
        raise ValueError(f"--modes: give at least one of {tuple(valid)}")
    for m in modes:
        if m not in valid:
            raise ValueError(f"--modes: unknown mode {m!r}; valid: {tuple(valid)}")
    return modes


def check_losses(losses: Iterable[str]) -> list[str]:
    """``--losses``: a non-empty list of :data:`LOSS_CHOICES`, without repeats."""
    losses = list(losses)
    bad = [l for l in losses if l not in LOSS_CHOICES]
    if not losses or bad or len(set(losses)) != len(losses):
        raise ValueError(f"--losses {losses!r}: give one or more of {LOSS_CHOICES}, each once")
    return losses


def validate_table1_args(sizes: Iterable[int], deltas: Iterable[int], modes: Iterable[str] | None,
                         *, device: str = "cpu", dtype: str = "float32", threads: int = 1,
                         repeats: int = 2, max_gb: float | None = None, out: str | Path = DEFAULT_OUT,
                         optimizer: str = "none", in_backward: bool = False
                         ) -> tuple[list[int], list[int], list[str] | None]:
    """Check every argument of :func:`run_table1` before any work; ``ValueError`` naming the
    argument (as the CLI spells it) and what would work."""
    sizes = _check_positive_ints("--size", sizes)
    deltas = _check_positive_ints("--deltas", deltas)
    if modes is not None:
        modes = check_modes(modes, ALL_MODES)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: use 'cpu' or 'cuda'")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of {DTYPES}")
    _check_positive_ints("--threads", [threads])
    _check_positive_ints("--repeats", [repeats], minimum=0)
    if max_gb is not None and not (isinstance(max_gb, (int, float)) and max_gb > 0):
        raise ValueError(f"--max-gb must be a positive number of GiB, got {max_gb!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file: give a directory (it is created "
                         f"if missing), e.g. --out data/results")
    optimizer_label(optimizer, in_backward)
    return sizes, deltas, modes


def _timestamp(out: Path) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, k = stamp, 1
    while (out / f"table1-{candidate}.csv").exists():  # never overwrite a previous run
        candidate = f"{stamp}-{k}"
        k += 1
    return candidate


def _parameter_check(log: Callable[[str], None]) -> list[str]:
    """Compare the parameter counts of the reference package iunets and of ours with :data:`PAPER_PARAMETERS`."""
    from iunet_nb.arch.layout import compute_layout, count_parameters

    msgs = []
    if not iunets_available():
        msgs.append("iunets: reference package not importable, skipped")
        log(msgs[-1])
        return msgs
    for delta, expected in PAPER_PARAMETERS.items():
        ours = count_parameters(compute_layout(CHANNELS, [delta] * 5, 2))["total"]
        with warnings.catch_warnings():
            # iunets 0.1 calls torch.lu/lu_solve, which torch deprecates (UserWarning); not ours
            warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|iunets)\.")
            ref = sum(p.numel() for p in build_model("iunets", delta).parameters())
        ok = abs(ref - ours) <= 0.01 * ours and abs(ref - expected) <= 0.01 * expected
        msgs.append(f"parameter check delta={delta}: iunets {ref:,}, iunet_nb {ours:,}, expected "
                    f"{expected:,} -> {'OK (within 1 %)' if ok else 'MISMATCH'}")
        log(msgs[-1])
    return msgs


def run_table1(sizes: Iterable[int] = DEFAULT_SIZES, deltas: Iterable[int] = DEFAULT_DELTAS,
               modes: Iterable[str] | None = None, *, device: str = "cpu", dtype: str = "float32",
               threads: int = 1, repeats: int = 2, max_gb: float | None = None,
               out: str | Path = DEFAULT_OUT, progress: bool = True, plot: bool = True,
               in_process: bool = False, log: Callable[[str], None] = print,
               optimizer: str = "none", in_backward: bool = False,
               losses: Iterable[str] = ("mean_square",)) -> Table1Run:
    """Measure the grid, one fresh subprocess per configuration; write CSV, latest copy and PNG.

    ``max_gb``: skip (with a message) every configuration whose *predicted* total exceeds it.
    ``in_process``: measure in this process instead (only for tiny grids, e.g. a notebook smoke run).
    ``optimizer`` (``'none'``, ``'sgd'``, ``'adamw'``): include the update in every measured step;
    ``in_backward``: apply it per parameter during the backward (:mod:`iunet_nb.engine.optim_in_backward`).
    ``losses``: each configuration is measured with each loss of :data:`LOSS_CHOICES` in turn
    (the report's last section compares their step times side by side).
    Every argument is checked before any work (``ValueError``); the CSV is written atomically after
    each configuration, so it is never empty or half-written.
    """
    from tqdm.auto import tqdm

    sizes, deltas, modes = validate_table1_args(
        sizes, deltas, modes, device=device, dtype=dtype, threads=threads, repeats=repeats,
        max_gb=max_gb, out=out, optimizer=optimizer, in_backward=in_backward)
    losses = check_losses(losses)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = _timestamp(out)
    csv_path = out / f"table1-{run_id}.csv"
    modes, messages = _available_modes(modes, log)
    measure = dict(dtype=dtype, device=device, threads=threads, repeats=repeats, optimizer=optimizer,
                   in_backward=in_backward)
    rows: list[dict] = []
    bar = tqdm([(s, d, m, l) for s in sizes for d in deltas for l in losses for m in modes], desc="table1",
               unit="config", disable=not progress, file=sys.stderr)
    for size, delta, mode, loss in bar:
        bar.set_postfix_str(f"{mode} {size}² δ={delta}" + ("" if loss == "mean_square" else f" {loss} loss"))
        row, message = _table1_row(mode, size, delta, max_gb, in_process, loss=loss, **measure)
        if message:
            messages.append(message)
            tqdm.write(message, file=sys.stderr)
        rows.append(dict(row, run=run_id))
        _write_csv_atomic(csv_path, rows)  # complete after every configuration
    latest = out / "table1-latest.csv"
    _write_csv_atomic(latest, rows)
    summary = summarize(rows)
    png = None
    if plot and summary["cell"]:
        png = plot_results(rows, out / f"table1-{run_id}.png", summary)
        shutil.copyfile(png, out / "table1-latest.png")
    return Table1Run(rows, csv_path, latest, png, summary, format_report(rows, summary), messages)


def _available_modes(modes: list[str] | None, log: Callable[[str], None]) -> tuple[list[str], list[str]]:
    """``(modes to measure, messages)``: all by default; ``iunets`` only where it can be imported,
    and then after checking its parameter counts (:func:`_parameter_check`)."""
    if modes is None:
        modes = [m for m in ALL_MODES if m != "iunets" or iunets_available()]
    modes, messages = list(modes), []
    if "iunets" in modes:
        if iunets_available():
            messages += _parameter_check(log)
        else:
            messages.append("iunets: reference package not importable, mode dropped")
            log(messages[-1])
            modes.remove("iunets")
    return modes, messages


def _table1_row(mode: str, size: int, delta: int, max_gb: float | None, in_process: bool,
                **measure: Any) -> tuple[dict, str]:
    """Measure one configuration (or skip it over ``max_gb``); ``(row, message or '')``.

    ``measure`` holds the keyword arguments of :func:`measure_config`.  The row gets the
    predicted total and the prediction's relative error (steps without an optimizer only:
    the predictor knows no optimizer state).
    """
    dtype, device, threads = measure["dtype"], measure["device"], measure["threads"]
    label = optimizer_label(measure["optimizer"], measure["in_backward"])
    pred = predicted_total(mode, size, delta, dtype) if label == "none" else None
    loss = measure["loss"]
    message = ""
    if max_gb is not None and pred is not None and pred > max_gb * GiB:
        message = (f"skipped {mode} {size}x{size} delta={delta}: predicted total "
                   f"{pred / GiB:.2f} GiB > --max-gb {max_gb:g}")
        row = dict(_failed_row(mode, size, delta, dtype, device, threads, message, status="skipped",
                               optimizer=label), loss=loss)
    elif in_process:
        row = measure_config(mode, size, delta, **measure)
    else:
        row = run_config(mode, size, delta, **measure)
        if row["status"] != "ok":
            message = f"error in {mode} {size}x{size} delta={delta}: {row.get('message')}"
    row["predicted_total_bytes"] = pred
    if row.get("status") == "ok" and pred:
        row["prediction_error"] = pred / row["total_bytes"] - 1
    return row, message


# ----------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m iunet_nb.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table1", help="measure the paper's Table 1 grid for every mode")
    t.add_argument("--size", "--sizes", dest="sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                   help="input sizes H=W (default: 64 128)")
    t.add_argument("--deltas", type=int, nargs="+", default=list(DEFAULT_DELTAS),
                   help="coupling layers per block (default: 5 10 20 30)")
    t.add_argument("--modes", nargs="+", default=None, choices=ALL_MODES,
                   help="default: all (iunets only when importable)")
    t.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    t.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="parameters and input in this dtype (bfloat16: pure bf16 training)")
    t.add_argument("--optimizer", default="none", choices=OPTIMIZER_CHOICES,
                   help="include the optimizer's update in the measured step (default: none, as Table 1)")
    t.add_argument("--optimizer-in-backward", action="store_true",
                   help="apply the update per parameter during the backward (iunet_nb.engine.optim_in_backward)")
    t.add_argument("--losses", nargs="+", default=["mean_square"], choices=LOSS_CHOICES,
                   help="measure each configuration with each loss: mean_square (the meter's, default) "
                        "and/or torch (y.square().mean(), the loss a user writes); the report compares "
                        "their step times side by side")
    t.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    t.add_argument("--repeats", type=int, default=2, help="timed steps per configuration (default 2)")
    t.add_argument("--max-gb", type=float, default=None,
                   help="skip configurations whose predicted total exceeds this many GiB")
    t.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default data/results)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--no-plot", action="store_true")
    r = sub.add_parser("report", help="print the report of a table1 CSV again (predictions refreshed)")
    r.add_argument("csv", nargs="+", help="table1 CSV file(s), e.g. data/results/table1-latest.csv")
    r.add_argument("--plot", default=None, help="also write the plot to this PNG")
    from .bench3d import add_cli

    add_cli(sub)  # volume3d and _one3d
    o = sub.add_parser("_one", help="(internal) measure one configuration, print JSON")
    o.add_argument("--json", action="store_true")
    o.add_argument("--mode", required=True, choices=ALL_MODES)
    o.add_argument("--size", type=int, required=True)
    o.add_argument("--delta", type=int, required=True)
    o.add_argument("--dtype", default="float32")
    o.add_argument("--device", default="cpu")
    o.add_argument("--threads", type=int, default=1)
    o.add_argument("--repeats", type=int, default=2)
    o.add_argument("--optimizer", default="none", choices=OPTIMIZER_CHOICES)
    o.add_argument("--optimizer-in-backward", action="store_true")
    o.add_argument("--loss", default="mean_square", choices=LOSS_CHOICES)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command in ("volume3d", "_one3d"):
        from .bench3d import main_cli

        return main_cli(args, parser)
    if args.command == "_one":
        row = measure_config(args.mode, args.size, args.delta, dtype=args.dtype, device=args.device,
                             threads=args.threads, repeats=args.repeats, optimizer=args.optimizer,
                             in_backward=args.optimizer_in_backward, loss=args.loss)
        print(json.dumps(row))
        return 0
    if args.command == "report":
        rows = [row for path in args.csv for row in read_results(path)]
        for row in rows:  # predictions with the current constants of iunet_nb.measure.predict
            if row.get("status") == "ok":
                pred = predicted_total(row["mode"], row["size"], row["delta"], row.get("dtype") or "float32")
                row["predicted_total_bytes"] = pred
                row["prediction_error"] = pred / row["total_bytes"] - 1 if pred else None
        print(format_report(rows))
        if args.plot:
            plot_results(rows, args.plot)
        return 0
    try:  # every argument checked before any work: a clear message, no traceback, no files
        validate_table1_args(args.sizes, args.deltas, args.modes, device=args.device, dtype=args.dtype,
                             threads=args.threads, repeats=args.repeats, max_gb=args.max_gb,
                             out=args.out, optimizer=args.optimizer,
                             in_backward=args.optimizer_in_backward)
        check_losses(args.losses)
    except ValueError as err:
        parser.error(str(err))
    run = run_table1(args.sizes, args.deltas, args.modes, device=args.device, dtype=args.dtype,
                     threads=args.threads, repeats=args.repeats, max_gb=args.max_gb, out=args.out,
                     progress=not args.no_progress, plot=not args.no_plot, optimizer=args.optimizer,
                     in_backward=args.optimizer_in_backward, losses=args.losses)
    print(run.report)
    print()
    print(f"results: {run.csv_path} (copy: {run.latest_path})" +
          (f", plot: {run.png_path}" if run.png_path else ""))
    return 0 if any(r.get("status") == "ok" for r in run.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
