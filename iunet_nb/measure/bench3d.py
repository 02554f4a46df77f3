"""The largest trainable 3D volume per training mode: ``python -m iunet_nb.bench volume3d``.

The question a researcher asks before buying hardware: *how large a volume can I train?*
The model is a small 3D segmentation-style network

    1 input channel -> 3x3x3 convolution to 16 channels -> 3D body with 4 levels
    (channels 16/32/64/128, stride 2, 2 blocks per level and side) -> 3x3x3 convolution to
    1 channel

trained on one cubic volume ``D^3`` (batch 1, float32, loss = mean square of the output).  The
body is, per mode,

``unet``                  the plain U-Net of :mod:`iunet_nb.arch.baselines` with the same channels
``unet_checkpoint``       that U-Net with ``torch.utils.checkpoint`` per level
``iunets``                the reference package ``iunets`` 0.1 (memcnn inside), if importable
``memcnn``                this package's iUNet with every step wrapped in memcnn
``fused``                 this package's iUNet with the fused memory-efficient engine
``fused_consuming``       the same in its opt-in consuming mode (``consume_output=True``: the
                          backward reuses the memory of the body's output and its gradient; in
                          this model the default mode does so too, as the caller keeps only
                          the output convolution's output: ownership note 12)
``fused_sgd_in_backward`` the same, with SGD applied per parameter during the backward
                          (:mod:`iunet_nb.engine.optim_in_backward`), so the step includes the update

The two outer convolutions are the package's tiled ones (:class:`iunet_nb.nn.conv.TiledConv`:
the function of ``nn.Conv3d(..., 3, padding=1)``, computed slab by slab on CPU) in every mode,
so they cost every body the same.  Torch's CPU ``nn.Conv3d`` allocates activation-sized working
buffers (the 16 -> 1 convolution's backward two 16-channel ones besides its input gradient),
which would be the largest allocation of the step for the memory-efficient bodies: the
comparison would measure the outer convolutions rather than the bodies.

For each mode the largest ``D`` (a multiple of 8, the body's downsampling factor) whose
measured total (parameters + input + step peak, :func:`iunet_nb.measure.meter.measure_step`) fits
``--budget-gib`` is found: a first guess from the predictor (:mod:`iunet_nb.measure.predict`, plus the
two outer convolutions), then a bracketing search of measured steps, each in a fresh process,
until ``D`` fits and ``D + 8`` does not (both measured).  One step at ``D`` is timed without
the profiler (one thread).

``--device cuda`` runs the same search on the GPU (as ``bench table1 --device cuda``): the
model and the volume live on the GPU and the meter reads the CUDA caching allocator
(``torch.cuda.max_memory_allocated``: bytes handed to tensors, not the allocator's reserved
pool); the outer convolutions are then plain whole-tensor ones (see ``docs/engine-devices.md``).  Results: a table on stdout, ``data/results/volume3d-<stamp>.csv``
(one row per mode), ``...-points.csv`` (every measured step) and a PNG.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from iunet_nb.common import GiB, MiB
from iunet_nb.measure.bench import DEFAULT_OUT, REPO, check_modes, iunets_available
from iunet_nb.nn.conv import TiledConv

__all__ = [
    "MODES",
    "CHANNELS",
    "VolumeNet",
    "build_volume_model",
    "measure_volume",
    "predicted_volume_total",
    "predicted_largest",
    "largest_volume",
    "run_volume3d",
    "read_volume_csv",
    "latest_volume_csv",
    "plot_volume3d",
    "VolumeRun",
]

MODES = ("unet", "unet_checkpoint", "iunets", "memcnn", "fused", "fused_consuming",
         "fused_sgd_in_backward")
CHANNELS = (16, 32, 64, 128)
ARCHITECTURE = (2, 2, 2, 2)
STEP = 8  # the body's downsampling factor per axis (3 downsamplings by 2)
#: default budget: the whole run (7 modes, 2-4 measured steps each) takes about 7 minutes
#: on one CPU thread here (unloaded; 0.25 GiB: 3 minutes)
DEFAULT_BUDGET_GIB = 0.5

CSV_COLUMNS = ["run", "mode", "budget_gib", "D", "voxels", "voxel_ratio_to_iunets", "total_bytes",
               "peak_bytes", "param_bytes", "grad_bytes", "activation_bytes", "overhead_tensors",
               "seconds", "next_D", "next_total_bytes", "predicted_D", "measured_steps", "status",
               "message", "device"]
POINT_COLUMNS = ["run", "mode", "D", "total_bytes", "peak_bytes", "fits", "seconds", "status",
                 "message", "device"]
#: ``--device`` choices (the meters of :func:`iunet_nb.measure.meter.measure_step`)
DEVICES = ("cpu", "cuda")


def check_device(device: Any, option: str = "--device") -> str:
    """``device`` if it is one of :data:`DEVICES` and usable here; ``ValueError`` naming the fix."""
    if device not in DEVICES:
        raise ValueError(f"{option} {device!r}: use one of {DEVICES}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} cuda but CUDA is not available (torch {torch.__version__}, CUDA "
                         f"build {torch.version.cuda or 'none'}): use {option} cpu, or a machine "
                         "with a GPU and a CUDA build of torch")
    return device


# ----------------------------------------------------------------------------- the model
class VolumeNet(nn.Module):
    """``conv_out(body(conv_in(x)))`` for ``x`` of shape ``(N, 1, D, H, W)``: 3x3x3
    convolutions 1 -> ``width`` and ``width`` -> 1 around a body ``(N, width, ...) -> same``.

    The outer convolutions are :class:`~iunet_nb.nn.conv.TiledConv` for every body (same
    function, parameters and initialisation as ``nn.Conv3d(.., 3, padding=1)``): on CPU they
    run slab by slab, so their activation-sized working buffers do not set the step's peak
    (see the module docstring).
    """

    def __init__(self, body: nn.Module, width: int = CHANNELS[0]) -> None:
        super().__init__()
        self.conv_in = TiledConv(1, width, 3)
        self.body = body
        self.conv_out = TiledConv(width, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.body(self.conv_in(x)))


def build_volume_model(mode: str, seed: int = 0):
    """The volume model of ``mode`` (see the module docstring), float32 on the CPU."""
    from iunet_nb.arch.baselines import UNet
    from iunet_nb.arch.iunet import iUNet

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    torch.manual_seed(seed)
    if mode in ("unet", "unet_checkpoint"):
        body = UNet(channels=CHANNELS, architecture=ARCHITECTURE, dim=3,
                    checkpoint_levels=mode == "unet_checkpoint")
    elif mode == "iunets":
        from iunet_nb.engine.memcnn import import_memcnn

        import_memcnn()  # before iunets: memcnn's import would disable UserWarnings
        import iunets

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|iunets)\.")
            body = iunets.iUNet(in_channels=CHANNELS[0], architecture=ARCHITECTURE, dim=3)
    else:
        body = iUNet(channels=CHANNELS, architecture=ARCHITECTURE, dim=3, verbose=0,
                     me_backend="memcnn" if mode == "memcnn" else "fused",
                     consume_output=mode == "fused_consuming")
    return VolumeNet(body)


# ----------------------------------------------------------------------------- prediction
def predicted_volume_total(mode: str, D: int) -> int:
    """Predicted total bytes of one step at ``D^3`` (the predictor's body figure plus the two
    outer convolutions: their weights and gradients, the 1-channel input, the body's input,
    which the step allocates, and the output and its gradient; being tiled, the outer
    convolutions' working buffers are slab-sized and left out).  The predictor does not model
    the body's output being taken: in this model the caller keeps only the output convolution's
    output, so every fused mode's backward takes over the body's output (ownership note 12 of
    :mod:`iunet_nb.engine.contract`; the gradient is reused anyway), and the figure is fused's
    less that tensor (a first guess for the search only)."""
    from iunet_nb.arch.layout import compute_layout
    from iunet_nb.measure.predict import predict_step_memory

    layout = compute_layout(CHANNELS, ARCHITECTURE, 3)
    pmode = {"iunets": "memcnn", "fused_sgd_in_backward": "fused", "fused_consuming": "fused"}.get(mode, mode)
    p = predict_step_memory(layout, (1, CHANNELS[0], D, D, D), "float32", pmode)
    vox = D**3
    conv_params = 4 * 2 * (27 * CHANNELS[0] + 1) + 4 * (CHANNELS[0] - 1)  # weights + biases
    outer = 2 * conv_params + 4 * vox * (1 + 2) + p.tensor  # x, output and its gradient, body input
    total = p.total - p.input + outer
    if mode == "fused_sgd_in_backward":
        total -= p.gradients  # the gradients are applied and freed as they come
    if mode.startswith("fused"):
        total -= p.tensor
    return int(total)


def predicted_largest(mode: str, budget_bytes: int, d_max: int = 4096) -> int:
    """Largest multiple of :data:`STEP` whose predicted total fits (0 if none)."""
    best = 0
    d = STEP
    while d <= d_max and predicted_volume_total(mode, d) <= budget_bytes:
        best = d
        d += STEP
    return best


# ----------------------------------------------------------------------------- measuring
def measure_volume(mode: str, D: int, *, budget_bytes: int | None = None, time_it: bool = True,
                   threads: int = 1, seed: int = 0, device: str = "cpu") -> dict:
    """Measure one training step of ``mode`` at ``D^3`` in this process, on ``device``
    (``'cpu'`` or ``'cuda'``: the model and the volume are moved there, and the meter is the
    device's: the CPU allocator's events, or the CUDA caching allocator's peak).

    Returns a dict with ``total_bytes``, ``peak_bytes``, ``param_bytes``, ``grad_bytes``,
    ``activation_bytes``, ``overhead_tensors`` (activations / bytes of one 16-channel
    ``D^3`` float32 tensor) and ``seconds`` (one unprofiled step after the measured one; only
    if ``time_it`` and the step fits ``budget_bytes``, else ``None``).
    """
    from iunet_nb.measure.meter import measure_step, time_step

    check_device(device)
    torch.set_num_threads(int(threads))
    model = build_volume_model(mode, seed).to(device)
    x = torch.randn(1, 1, D, D, D, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    handle = None
    if mode == "fused_sgd_in_backward":
        from iunet_nb.engine.optim_in_backward import optimizer_in_backward

        handle = optimizer_in_backward(model, "sgd", lr=1e-3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|iunets|memcnn)\.")
        m = measure_step(model, x)
        fits = budget_bytes is None or m.total_bytes <= budget_bytes
        seconds = min(time_step(model, x, repeats=1, warmup=0)) if time_it and fits else None
    if handle is not None:
        handle.remove()
    tensor = CHANNELS[0] * D**3 * 4
    return dict(mode=mode, D=D, total_bytes=m.total_bytes, peak_bytes=m.peak_bytes,
                param_bytes=m.param_bytes, grad_bytes=m.grad_bytes,
                activation_bytes=m.activation_bytes, overhead_tensors=m.activation_bytes / tensor,
                seconds=seconds, status="ok", message="", device=str(m.device))


def run_point(mode: str, D: int, budget_bytes: int, *, threads: int = 1,
              timeout: float = 900.0, device: str = "cpu") -> dict:
    """:func:`measure_volume` in a fresh subprocess (status 'error' with a message on failure)."""
    cmd = [sys.executable, "-m", "iunet_nb.measure.bench", "_one3d", "--mode", mode, "--D", str(D),
           "--budget-bytes", str(int(budget_bytes)), "--threads", str(threads), "--device", device]
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(mode=mode, D=D, status="error", message=f"timed out after {timeout:.0f} s",
                    device=device)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        msg = tail[-1] if tail else f"exit code {proc.returncode}"
        if proc.returncode < 0 or proc.returncode == 137:
            msg = "killed (out of memory?)"
        return dict(mode=mode, D=D, status="error", message=msg, device=device)
    return json.loads(lines[-1])


def _scaled_guess(D: int, total: int, budget: int, fixed: int) -> int:
    """Multiple of STEP where ``fixed + (total - fixed) * (D'/D)^3`` reaches the budget."""
    var = max(total - fixed, 1)
    room = max(budget - fixed, 0)
    return max(STEP, int(D * (room / var) ** (1 / 3)) // STEP * STEP)


def largest_volume(mode: str, budget_bytes: int, measure: Callable[[int], dict],
                   first_guess: int, *, max_steps: int = 8) -> dict:
    """Bracketing search: the largest ``D`` (multiple of :data:`STEP`) whose measured total fits.

    ``measure(D)`` returns a point dict (``status``, ``total_bytes``).  Starting at
    ``first_guess``, each measurement moves the bracket ``[fit, fail]`` (using the measured
    totals, scaled with ``D^3``, to jump) until ``fail == fit + STEP``.  Returns ``dict(D, next,
    points, fit_point, next_point, status, message)``; ``D = 0`` if even ``STEP`` does not fit.
    """
    points: dict[int, dict] = {}
    lo, hi = 0, None  # largest measured fit, smallest measured failure
    d = max(STEP, first_guess // STEP * STEP)
    fixed = 0
    for _ in range(max_steps):
        pt = measure(d)
        points[d] = pt
        if pt.get("status") != "ok":
            return dict(D=lo, next=hi, points=points, status="error",
                        message=f"D={d}: {pt.get('message')}")
        fixed = fixed or int(2.5 * pt.get("param_bytes", 0))
        if pt["total_bytes"] <= budget_bytes:
            lo = max(lo, d)
        else:
            hi = d if hi is None else min(hi, d)
        if hi is not None and hi - lo <= STEP:
            break
        if hi is None:  # only fits so far: jump up
            d = max(lo + STEP, _scaled_guess(d, pt["total_bytes"], budget_bytes, fixed))
        elif lo == 0 and hi == STEP:
            break  # nothing fits
        elif lo == 0:  # only failures so far: jump down
            d = min(hi - STEP, _scaled_guess(d, pt["total_bytes"], budget_bytes, fixed))
        else:  # bisect, guided by the scaled guess
            g = _scaled_guess(d, pt["total_bytes"], budget_bytes, fixed)
            d = min(max(g, lo + STEP), hi - STEP)
            if d in points:
                d = (lo + hi) // 2 // STEP * STEP
    done = hi is not None and hi - lo <= STEP
    return dict(D=lo, next=hi, points=points, status="ok" if done else "unconfirmed",
                message="" if done else f"bracket [{lo}, {hi}] not closed in {max_steps} steps")


# ----------------------------------------------------------------------------- the run
@dataclass
class VolumeRun:
    """What :func:`run_volume3d` produced."""

    rows: list[dict]
    points: list[dict]
    csv_path: Path | None
    points_path: Path | None
    png_path: Path | None
    report: str
    messages: list[str] = field(default_factory=list)


def _write_csv_atomic(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    from iunet_nb.measure.bench import _write_csv_atomic as write

    write(path, rows, columns)


def validate_volume_args(budget_gib: Any, modes: Sequence[str] | None, out: str | Path,
                         threads: Any = 1, device: Any = "cpu") -> list[str]:
    """Check the arguments before any work; ``ValueError`` naming the CLI option."""
    check_device(device)
    if isinstance(budget_gib, bool) or not isinstance(budget_gib, (int, float)) \
            or not math.isfinite(budget_gib) or budget_gib <= 0:
        raise ValueError(f"--budget-gib must be a positive number of GiB, got {budget_gib!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads must be an integer >= 1, got {threads!r}")
    if modes is None:
        modes = [m for m in MODES if m != "iunets" or iunets_available()]
    modes = check_modes(modes, MODES)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file: give a directory")
    return modes


def run_volume3d(budget_gib: float = DEFAULT_BUDGET_GIB, modes: Sequence[str] | None = None, *,
                 out: str | Path = DEFAULT_OUT, threads: int = 1, progress: bool = True,
                 plot: bool = True, measure: Callable[[str, int, int], dict] | None = None,
                 log: Callable[[str], None] = print, device: str = "cpu") -> VolumeRun:
    """Find the largest volume of every mode; write the CSVs and the PNG; return the report.

    ``measure(mode, D, budget_bytes)`` defaults to :func:`run_point` (a fresh process per step,
    on ``device``).
    """
    from tqdm.auto import tqdm

    modes = validate_volume_args(budget_gib, modes, out, threads, device)
    measure = measure or (lambda m, d, b: run_point(m, d, b, threads=threads, device=device))
    budget = int(budget_gib * GiB)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_id = stamp
    csv_path = out / f"volume3d-{run_id}.csv"
    points_path = out / f"volume3d-{run_id}-points.csv"
    rows: list[dict] = []
    all_points: list[dict] = []
    messages: list[str] = []
    bar = tqdm(modes, desc="volume3d", unit="mode", disable=not progress, file=sys.stderr)
    for mode in bar:
        bar.set_postfix_str(mode)
        guess = predicted_largest(mode, budget)

        def one(d: int, mode: str = mode) -> dict:
            pt = measure(mode, d, budget)
            pt = dict(pt, run=run_id, mode=mode, D=d, fits=pt.get("status") == "ok"
                      and pt["total_bytes"] <= budget)
            pt.setdefault("device", device)
            all_points.append(pt)
            _write_csv_atomic(points_path, all_points, POINT_COLUMNS)
            return pt

        res = largest_volume(mode, budget, one, guess)
        fit = res["points"].get(res["D"], {})
        nxt = res["points"].get(res["next"], {}) if res["next"] else {}
        row = dict(run=run_id, mode=mode, budget_gib=budget_gib, D=res["D"], voxels=res["D"] ** 3,
                   predicted_D=guess, measured_steps=len(res["points"]), status=res["status"],
                   message=res["message"], next_D=res["next"], device=device,
                   next_total_bytes=nxt.get("total_bytes"))
        for k in ("total_bytes", "peak_bytes", "param_bytes", "grad_bytes", "activation_bytes",
                  "overhead_tensors", "seconds"):
            row[k] = fit.get(k)
        if res["status"] != "ok":
            messages.append(f"{mode}: {res['message']}")
            tqdm.write(messages[-1], file=sys.stderr)
        rows.append(row)
        _add_ratios(rows)
        _write_csv_atomic(csv_path, rows, CSV_COLUMNS)
    png = None
    if plot and rows:
        png = plot_volume3d(rows, all_points, out / f"volume3d-{run_id}.png", budget_gib)
    report = format_volume_report(rows, budget_gib, messages, device=device)
    return VolumeRun(rows, all_points, csv_path, points_path, png, report, messages)


def _add_ratios(rows: list[dict]) -> None:
    ref = next((r for r in rows if r["mode"] == "iunets" and r["D"]), None)
    for r in rows:
        r["voxel_ratio_to_iunets"] = r["voxels"] / ref["voxels"] if ref else None


TARGET_RATIO = 2.5


def format_volume_report(rows: Sequence[dict], budget_gib: float, messages: Sequence[str] = (),
                         device: str = "cpu") -> str:
    """The printed table: D, voxels, ratio to iunets, measured peak, step time; and the target."""
    where = "CPU, one thread" if device == "cpu" else "CUDA, the caching allocator's peak"
    lines = [f"Largest cubic volume D^3 whose training step fits {budget_gib:g} GiB (1 -> 16 channels, "
             f"3D body {CHANNELS}, 2 blocks per level and side, stride 2; batch 1, float32; {where}; "
             "total = parameters + input + step peak, measured)"]
    hdr = (f"{'mode':<22} {'D':>4} {'voxels':>10} {'/iunets':>8} {'total MiB':>10} {'peak MiB':>9} "
           f"{'act. T':>7} {'step s':>7} {'D+8 MiB':>9} {'pred. D':>7}")
    lines += [hdr, "-" * len(hdr)]
    for r in rows:
        ratio = r.get("voxel_ratio_to_iunets")
        tot, peak = r.get("total_bytes"), r.get("peak_bytes")
        nxt = r.get("next_total_bytes")
        lines.append(
            f"{r['mode']:<22} {r['D']:>4} {r['voxels']:>10,} {(f'{ratio:.2f}x' if ratio else '-'):>8} "
            f"{(f'{tot / MiB:.1f}' if tot else '-'):>10} {(f'{peak / MiB:.1f}' if peak else '-'):>9} "
            f"{(format(r['overhead_tensors'], '.2f') if r.get('overhead_tensors') else '-'):>7} "
            f"{(format(r['seconds'], '.2f') if r.get('seconds') else '-'):>7} "
            f"{(f'{nxt / MiB:.1f}' if nxt else '-'):>9} {r.get('predicted_D', '-'):>7}"
            + ("" if r.get("status") == "ok" else f"  {str(r.get('status')).upper()}: {r.get('message')}"))
    lines.append("'D+8 MiB': measured total at the next candidate (does not fit); 'act. T': (peak - "
                 "gradients) / one 16-channel D^3 float32 tensor; 'pred. D': the predictor's first guess; "
                 "step times on a shared 2-core machine are noisy")
    fused = next((r for r in rows if r["mode"] == "fused"), None)
    if fused and fused.get("voxel_ratio_to_iunets"):
        v = fused["voxel_ratio_to_iunets"]
        lines.append(f"  [{'PASS' if v >= TARGET_RATIO else 'FAIL'}] fused >= {TARGET_RATIO}x the voxels "
                     f"of iunets 0.1: {v:.2f}x")
    lines += [f"  note: {m}" for m in messages]
    return "\n".join(lines)


def plot_volume3d(rows: Sequence[dict], points: Sequence[dict], path: str | Path,
                  budget_gib: float) -> Path:
    """PNG: (left) the largest D^3 per mode, in voxels, with the ratio to iunets; (right) every
    measured step's total vs D with the budget line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13.5, 4.6))
    ax1, ax2 = fig.subplots(1, 2)
    names = [r["mode"] for r in rows]
    vox = [r["voxels"] / 1e6 for r in rows]
    colors = {m: f"C{i}" for i, m in enumerate(MODES)}
    bars = ax1.bar(range(len(rows)), vox, color=[colors[m] for m in names])
    for b, r in zip(bars, rows):
        ratio = r.get("voxel_ratio_to_iunets")
        label = f"D={r['D']}" + (f"\n{ratio:.2f}×" if ratio else "")
        ax1.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                     va="bottom", fontsize=8)
    ax1.set_xticks(range(len(rows)), [n.replace("_", "\n") for n in names], fontsize=8)
    ax1.set_xlabel("above the bars: cube side D (voxels) and the voxels relative to iunets 0.1",
                   fontsize=8)
    ax1.set_ylabel("largest trainable volume D³ (million voxels)")
    ax1.set_title(f"Largest cube whose training step fits {budget_gib:g} GiB")
    ax1.set_ylim(0, max(vox + [1e-6]) * 1.3)
    ax1.grid(axis="y", alpha=0.3)
    styles = mode_styles()
    shrink = 1 / max(len(names) - 1, 1)
    for k, m in enumerate(names):
        pts = sorted((p["D"], p["total_bytes"] / MiB) for p in points
                     if p["mode"] == m and p.get("status") == "ok")
        if pts:  # distinct markers and dashes, later ones thinner: modes with equal figures stay visible
            mk, ls = styles[m]
            ax2.plot(*zip(*pts), marker=mk, ls=ls, ms=7 - 3.5 * k * shrink, mfc="none",
                     lw=2.2 - 1.4 * k * shrink, color=colors[m], label=m)
    ax2.axhline(budget_gib * 1024, color="k", ls=":", label=f"budget {budget_gib:g} GiB")
    ax2.set_xlabel("D (cube side, voxels)")
    ax2.set_ylabel("measured total of one training step (MiB)")
    ax2.set_title("Every measured step of the search")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no point hidden
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


#: markers and line styles of :func:`plot_volume3d`, cycled over :data:`MODES`
MARKERS, LINESTYLES = "osD^vPX*<>hp", ("-", "--", ":", "-.")


def mode_styles(modes: Sequence[str] = MODES) -> dict[str, tuple[str, str]]:
    """``{mode: (marker, line style)}``; the pairs differ for up to ``len(MARKERS)`` modes."""
    return {m: (MARKERS[i % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)]) for i, m in enumerate(modes)}


def latest_volume_csv(results_dir: str | Path = DEFAULT_OUT) -> Path | None:
    """The newest ``volume3d-<stamp>.csv`` (by the stamp in its name, not the ``-points.csv``) in
    ``results_dir``; ``None`` if there is none."""
    found = {}
    for path in Path(results_dir).glob("volume3d-*.csv"):
        match = re.fullmatch(r"volume3d-(\d{8}-\d{6})\.csv", path.name)
        if match:
            found[match.group(1)] = path
    return found[max(found)] if found else None


def read_volume_csv(path: str | Path) -> list[dict]:
    """Rows of a volume3d CSV (either file) with numbers converted."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in list(r.items()):
            if v in ("", None):
                r[k] = None
            elif k in ("fits",):
                r[k] = v == "True"
            elif k not in ("run", "mode", "status", "message", "device"):
                r[k] = float(v) if any(c in v for c in ".en") else int(v)
    return rows


def add_cli(sub: Any) -> None:
    """Add the ``volume3d`` and internal ``_one3d`` subcommands to the bench CLI."""
    v = sub.add_parser("volume3d", help="largest trainable 3D volume per mode within a memory budget")
    v.add_argument("--budget-gib", type=float, default=DEFAULT_BUDGET_GIB,
                   help=f"memory budget in GiB (default {DEFAULT_BUDGET_GIB:g}: about 7 min on one idle core here)")
    v.add_argument("--modes", nargs="+", default=None, choices=MODES,
                   help="default: all (iunets only when importable)")
    v.add_argument("--threads", type=int, default=1)
    v.add_argument("--device", default="cpu", choices=DEVICES,
                   help="measure on this device (cuda: the CUDA allocator's peak; default cpu)")
    v.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default data/results)")
    v.add_argument("--no-progress", action="store_true")
    v.add_argument("--no-plot", action="store_true")
    o = sub.add_parser("_one3d", help="(internal) measure one volume step, print JSON")
    o.add_argument("--mode", required=True, choices=MODES)
    o.add_argument("--D", type=int, required=True)
    o.add_argument("--budget-bytes", type=int, default=None)
    o.add_argument("--threads", type=int, default=1)
    o.add_argument("--device", default="cpu", choices=DEVICES)


def main_cli(args: Any, parser: Any) -> int:
    """Run the ``volume3d`` / ``_one3d`` subcommands."""
    if args.command == "_one3d":
        print(json.dumps(measure_volume(args.mode, args.D, budget_bytes=args.budget_bytes,
                                        threads=args.threads, device=args.device)))
        return 0
    try:
        modes = validate_volume_args(args.budget_gib, args.modes, args.out, args.threads, args.device)
    except ValueError as err:
        parser.error(str(err))
    run = run_volume3d(args.budget_gib, modes, out=args.out, threads=args.threads,
                       progress=not args.no_progress, plot=not args.no_plot, device=args.device)
    print(run.report)
    print()
    print(f"results: {run.csv_path}, every measured step: {run.points_path}"
          + (f", plot: {run.png_path}" if run.png_path else ""))
    return 0 if any(r.get("status") == "ok" for r in run.rows) else 1
