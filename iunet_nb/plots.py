"""Figures for the notebooks: every axis labelled, every quantity with its unit.

All functions draw on a given ``ax`` (or a new figure) and return the axes or
figure, so a notebook can adjust them further.  :func:`use_notebook_style`
sets a moderate resolution that keeps executed notebooks small.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["use_notebook_style", "plot_loss", "bar_chart", "plot_curves", "show_images", "BYTE_UNITS",
           "to_unit"]

#: Divisors for byte counts.
BYTE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def use_notebook_style(dpi: int = 80) -> None:
    """Moderate figure resolution and a readable default size (keeps notebooks < 2 MB)."""
    plt.rcParams.update({
        "figure.dpi": dpi,
        "savefig.dpi": dpi,
        "figure.figsize": (6.0, 3.6),
        "axes.grid": True,
        "grid.alpha": 0.3,
    })


def to_unit(num_bytes: float, unit: str = "MiB") -> float:
    """Convert a byte count to ``unit`` (``'B'``, ``'KiB'``, ``'MiB'``, ``'GiB'``)."""
    if unit not in BYTE_UNITS:
        raise ValueError(f"unit must be one of {tuple(BYTE_UNITS)}, got {unit!r}")
    return num_bytes / BYTE_UNITS[unit]


def _axes(ax):
    if ax is None:
        _, ax = plt.subplots()
    return ax


def plot_loss(history: Sequence[float], ax=None, ylabel: str = "loss", log: bool = True,
              title: str | None = None, label: str | None = None):
    """Loss per optimisation step (x: step, y: ``ylabel``; log y-axis by default)."""
    ax = _axes(ax)
    ax.plot(np.arange(1, len(history) + 1), history, label=label)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if label:
        ax.legend()
    return ax


def bar_chart(values: Mapping[str, float], ylabel: str, ax=None, title: str | None = None,
              fmt: str = "{:.2f}", colors: Sequence[str] | None = None):
    """One labelled bar per entry of ``values``, each annotated with its value."""
    ax = _axes(ax)
    names = list(values)
    heights = [float(values[k]) for k in names]
    bars = ax.bar(names, heights, color=colors)
    for bar, h in zip(bars, heights):
        ax.annotate(fmt.format(h), (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom",
                    xytext=(0, 2), textcoords="offset points")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(heights) * 1.15 if heights and max(heights) > 0 else 1)
    ax.grid(axis="x", visible=False)
    if title:
        ax.set_title(title)
    return ax


def plot_curves(x: Sequence[float], curves: Mapping[str, Sequence[float]], xlabel: str, ylabel: str,
                ax=None, logx: bool = False, logy: bool = False, title: str | None = None,
                marker: str = "o"):
    """Several named curves over a common ``x`` (labelled axes, legend, optional log scales)."""
    ax = _axes(ax)
    for name, ys in curves.items():
        ax.plot(list(x), list(ys), marker=marker, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.legend()
    return ax


def _as_2d(img) -> np.ndarray:
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu().to(torch.float64).numpy()
    img = np.asarray(img)
    img = np.squeeze(img)
    if img.ndim != 2:
        raise ValueError(f"show_images needs 2D images (after squeezing), got shape {img.shape}")
    return img


def show_images(images: Sequence, titles: Sequence[str] | None = None, ncols: int | None = None,
                cmap: str = "gray", symmetric: bool = False, colorbar_label: str | None = None,
                size: float = 2.6, suptitle: str | None = None, share_range: bool = False):
    """A grid of 2D images with pixel-labelled axes; returns the figure.

    Args:
        images: tensors or arrays, each 2D after squeezing.
        titles: one title per image.
        ncols: images per row (default: all in one row).
        symmetric: colour range symmetric about 0 (for signed images: detail sub-bands, errors).
        colorbar_label: if given, a colour bar with this label (quantity and unit) per image.
        share_range: one colour range for all images (otherwise per image).
    """
    arrays = [_as_2d(im) for im in images]
    n = len(arrays)
    ncols = n if ncols is None else ncols
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False)
    lo = min(a.min() for a in arrays) if share_range else None
    hi = max(a.max() for a in arrays) if share_range else None
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        a = arrays[k]
        vmin, vmax = (lo, hi) if share_range else (a.min(), a.max())
        if symmetric:
            m = max(abs(vmin), abs(vmax)) or 1.0
            vmin, vmax = -m, m
        im = ax.imshow(a, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.grid(False)
        ax.set_xlabel("x (pixel)")
        ax.set_ylabel("y (pixel)")
        if titles is not None:
            ax.set_title(titles[k], fontsize=9)
        if colorbar_label:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label(colorbar_label, fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig
