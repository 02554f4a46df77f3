"""Figures for the notebooks: every axis labelled, every quantity with its unit.

All functions draw on a given ``ax`` (or a new figure) and return the axes or
figure, so a notebook can adjust them further.

The collection's figure style (call :func:`use_notebook_style` once, after the
imports of a notebook):

* at least 100 dpi, and images shown with antialiased interpolation (no block
  artefacts that are not in the tensor);
* every axis labelled with its quantity and unit; legends placed where they
  hide no data (outside the axes when in doubt: ``legend="outside"``);
* panels that are compared share one colour scale (``show_images`` does this by
  default, with one colour bar);
* logarithmic axes where the values span decades.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from iunet_nb.common import GiB, KiB, MiB

__all__ = ["use_notebook_style", "STYLE", "plot_loss", "bar_chart", "plot_curves", "place_legend",
           "show_images", "BYTE_UNITS", "to_unit"]

#: Divisors for byte counts.
BYTE_UNITS = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB}


#: The rcParams of the collection's style (see the module docstring).
STYLE = {
    "figure.figsize": (6.0, 3.6),
    "axes.grid": True,
    "grid.alpha": 0.3,
    "image.interpolation": "antialiased",
    "image.cmap": "gray",
    "legend.fontsize": 8,
    "legend.framealpha": 0.9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
}


def use_notebook_style(dpi: int = 100) -> None:
    """Apply the collection's figure style (:data:`STYLE`) at ``dpi`` dots per inch (>= 100 advised).

    Notebooks 00-07 call this once after their imports so that every figure
    looks the same; ``dpi`` applies to both the inline display and saved files.
    """
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or dpi <= 0:
        raise ValueError(f"dpi must be a positive number, got {dpi!r}")
    plt.rcParams.update(STYLE)
    plt.rcParams.update({"figure.dpi": dpi, "savefig.dpi": dpi})


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
                marker: str = "o", legend: str = "best"):
    """Several named curves over a common ``x`` (labelled axes, legend, optional log scales).

    ``legend``: a matplotlib location (``'best'``, ``'upper left'``, ...) or
    ``'outside'`` (right of the axes, hides nothing).
    """
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
    place_legend(ax, legend)
    return ax


def place_legend(ax, where: str = "best", **kwargs):
    """Add the legend of ``ax`` at ``where``; ``'outside'`` puts it right of the axes (hides no data)."""
    if where == "outside":
        return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)
    return ax.legend(loc=where, **kwargs)


def _as_2d(img) -> np.ndarray:
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu().to(torch.float64).numpy()
    img = np.asarray(img)
    img = np.squeeze(img)
    if img.ndim != 2:
        raise ValueError(f"show_images needs 2D images (after squeezing), got shape {img.shape}")
    return img


def _colour_norm(group: Sequence[np.ndarray], vmin: float | None, vmax: float | None, symmetric: bool,
                 log: bool):
    """The colour scale of the images ``group``: their range, or ``vmin``/``vmax`` where given;
    symmetric about 0 if ``symmetric``; logarithmic (from ``vmax / 1e4`` unless ``vmin > 0``) if ``log``."""
    from matplotlib.colors import LogNorm, Normalize

    lo = min(float(a.min()) for a in group) if vmin is None else vmin
    hi = max(float(a.max()) for a in group) if vmax is None else vmax
    if symmetric:
        m = max(abs(lo), abs(hi)) or 1.0
        lo, hi = -m, m
    if log:
        hi = hi if hi > 0 else 1.0
        lo = lo if (lo is not None and lo > 0 and vmin is not None) else hi * 1e-4
        return LogNorm(vmin=lo, vmax=hi, clip=True)
    return Normalize(vmin=lo, vmax=hi)


def show_images(images: Sequence, titles: Sequence[str] | None = None, ncols: int | None = None,
                cmap: str = "gray", symmetric: bool = False, colorbar_label: str | None = None,
                size: float = 3.0, suptitle: str | None = None, share_range: bool = True,
                log: bool = False, vmin: float | None = None, vmax: float | None = None,
                interpolation: str = "antialiased", pixel_axes: bool = True):
    """A grid of 2D images; returns the figure.

    Args:
        images: tensors or arrays, each 2D after squeezing.
        titles: one title per image.
        ncols: images per row (default: all in one row).
        symmetric: colour range symmetric about 0 (for signed images: detail sub-bands, errors).
        colorbar_label: if given, a colour bar with this label (quantity and unit): one for the
            figure when the range is shared, else one per image.
        share_range: one colour range for all images (the default: panels are compared).
        log: logarithmic colour scale (for magnitudes spanning decades; values <= 0 are shown at
            ``vmin``); ``vmin`` defaults to ``vmax / 1e4`` then.
        vmin, vmax: explicit colour range (overrides the data range).
        interpolation: matplotlib interpolation; ``'antialiased'`` avoids display artefacts when
            an image is drawn smaller or slightly larger than its pixel grid, and shows single
            pixels as blocks when it is magnified (> 3x).
        pixel_axes: label the axes "x (pixel)" / "y (pixel)" (else hide the ticks).
    """
    arrays = [_as_2d(im) for im in images]
    n = len(arrays)
    if n == 0:
        raise ValueError("images is empty")
    if titles is not None and len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} images")
    ncols = n if ncols is None else ncols
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols + (0.9 if colorbar_label else 0),
                                                    size * nrows + 0.3), squeeze=False,
                             layout="constrained")
    scale = dict(vmin=vmin, vmax=vmax, symmetric=symmetric, log=log)
    shared = _colour_norm(arrays, **scale) if share_range else None
    mappable = None
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        norm = shared if share_range else _colour_norm([arrays[k]], **scale)
        mappable = ax.imshow(arrays[k], cmap=cmap, norm=norm, interpolation=interpolation)
        ax.grid(False)
        if pixel_axes:
            ax.set_xlabel("x (pixel)")
            ax.set_ylabel("y (pixel)")
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        if titles is not None:
            ax.set_title(titles[k], fontsize=9)
        if colorbar_label and not share_range:
            fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.04).set_label(colorbar_label, fontsize=8)
    if colorbar_label and share_range:
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.9).set_label(colorbar_label, fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    return fig
