"""3D segmentation of synthetic volumes: an iUNet against a U-Net (the paper's Table 3 setting, small).

Data
    :func:`make_volumes` draws volumes with MONAI's
    :func:`monai.data.synthetic.create_test_image_3d`: ``num_objs`` random
    spheres, each labelled with one of ``num_classes`` intensity levels
    (label ``k`` has intensity ``k``), overlaid with uniform noise by
    ``image = rescale(max(level, U(0, num_classes * noise)))``.  With
    ``noise > 1 / num_classes`` the background noise reaches the intensity of
    the lower classes, so a per-voxel threshold cannot separate them
    (:func:`fit_voxelwise_classifier` measures that) and a network has to use
    each voxel's neighbourhood.

    :func:`make_context_volumes` draws a harder task that needs context by
    construction: every object has the *same* intensity in every channel and
    its class is its shape (ball, rod or plate), on a smooth random texture
    plus white noise, with several input channels (different contrast, texture
    and noise per channel, like MRI modalities) and any ``(D, H, W)``.  The
    voxel-wise rule can find objects but not tell their classes apart.
Models
    :func:`build_model`: ``1x1 conv (1 -> c0) -> body -> 1x1 conv (c0 -> classes + 1)``
    (:class:`iunet_nb.nn.wrappers.ChannelLift`, the talk's Figure 5), the body being
    a 3D :class:`iunet_nb.iUNet` (zero-initialised couplings: it starts as the
    identity) or a :class:`iunet_nb.arch.baselines.UNet` with the same channels and
    levels.
Metric
    :func:`dice_per_class`: Dice of every foreground class per volume
    (``nan`` where the ground truth has no voxel of that class, as MONAI's
    ``DiceMetric(ignore_empty=True)``).

``TASK`` is the ``segmentation3d`` task of :mod:`iunet_nb.train`.
"""
from __future__ import annotations

import argparse
import functools
import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from iunet_nb.apps.task import Task, engine_kwargs, positive_int

__all__ = [
    "make_volumes",
    "make_context_volumes",
    "CONTEXT_SHAPES",
    "fit_voxelwise_classifier",
    "apply_voxelwise_classifier",
    "dice_per_class",
    "build_model",
    "segmentation_loss",
    "predict_labels",
    "evaluate",
    "measure_volume_step",
    "fit_volume_memory",
    "largest_volume",
    "datasets",
    "model",
    "add_arguments",
    "TASK",
]

MODELS = ("iunet", "unet")
#: the ``--data`` choices: MONAI's intensity-coded spheres, or :func:`make_context_volumes`
DATA = ("spheres", "context")
#: class ``k`` of :func:`make_context_volumes` is ``CONTEXT_SHAPES[k - 1]``
CONTEXT_SHAPES = ("ball", "rod", "plate")


# ----------------------------------------------------------------------------- data
def make_volumes(n: int, size: int = 32, num_classes: int = 3, noise: float = 0.6, num_objs: int = 10,
                 rad_min: int = 3, rad_max: int | None = None, seed: int = 0,
                 shape: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """``n`` noisy volumes and their labels from MONAI's ``create_test_image_3d``.

    Returns:
        images: ``(n, 1, size, size, size)`` float32 in [0, 1];
        labels: ``(n, size, size, size)`` int64 in ``0..num_classes`` (0 = background).

    ``shape=(D, H, W)`` (optional) replaces the cube ``size``^3 by a box
    (MONAI draws the spheres in any box).  Deterministic in ``seed`` (a
    ``numpy.random.RandomState``).  ``rad_max`` defaults to ``min(shape) // 4``
    (MONAI needs ``min(shape) > 2 * rad_max``).
    """
    for name, value, low in (("n", n, 1), ("size", size, 8), ("num_classes", num_classes, 1),
                             ("num_objs", num_objs, 1), ("rad_min", rad_min, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {name}={value!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise:
        raise ValueError(f"noise must be >= 0 (0 = no noise, 1 = up to the top class), got noise={noise!r}")
    dims = (size,) * 3 if shape is None else _check_shape3d(shape, "shape", low=8)
    rad_max = min(dims) // 4 if rad_max is None else rad_max
    if not rad_min < rad_max < min(dims) / 2:
        raise ValueError(
            f"need rad_min < rad_max < min(shape) / 2, got rad_min={rad_min}, rad_max={rad_max}, "
            f"shape={dims}")
    x, y = _volumes(n, dims, num_classes, float(noise), num_objs, rad_min, rad_max, seed)
    return x.clone(), y.clone()


def _check_shape3d(shape: object, name: str, low: int) -> tuple[int, int, int]:
    """``shape`` as three ints ``>= low``, or a ``ValueError`` naming ``name``."""
    try:
        dims = tuple(shape)  # type: ignore[arg-type]
    except TypeError:
        dims = ()
    if len(dims) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low
                             for v in dims):
        raise ValueError(f"{name} must be three ints (D, H, W), each >= {low}, got {name}={shape!r}")
    return tuple(int(v) for v in dims)  # type: ignore[return-value]


@functools.lru_cache(maxsize=4)
def _volumes(n: int, dims: tuple[int, int, int], num_classes: int, noise: float, num_objs: int, rad_min: int,
             rad_max: int, seed: int) -> tuple[Tensor, Tensor]:
    """:func:`make_volumes` without checks, cached (a notebook and the loop build the same data)."""
    from monai.data.synthetic import create_test_image_3d

    rs = np.random.RandomState(seed)
    images, labels = [], []
    for _ in range(n):
        img, lab = create_test_image_3d(*dims, num_objs=num_objs, rad_max=rad_max,
                                        rad_min=rad_min, noise_max=noise, num_seg_classes=num_classes,
                                        random_state=rs)
        images.append(img)
        labels.append(lab)
    x = torch.from_numpy(np.stack(images)).float().unsqueeze(1)
    y = torch.from_numpy(np.stack(labels)).long()
    return x, y


def make_context_volumes(n: int, shape: Sequence[int] = (24, 32, 40), channels: int = 2, num_classes: int = 3,
                         num_objs: int = 8, texture: float = 0.4, noise: float = 0.3,
                         seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` multi-channel volumes whose classes differ in shape only, not in intensity.

    Each volume holds up to ``num_objs`` non-overlapping, axis-aligned objects
    (a 1-voxel gap between them); object ``i`` gets class ``1 + i % num_classes``
    and the shape ``CONTEXT_SHAPES[class - 1]``:

    * ``ball``: radius 3 or 4 (:func:`skimage.morphology.ball`);
    * ``rod``: a box 2-3 x 2-3 voxels across and 10-14 long, along a random axis;
    * ``plate``: a box 2-3 voxels thick and 7-10 x 7-10 wide, across a random axis

    (long sides are cut to fit small shapes).  Objects that find no free place
    in 50 tries are left out.  Channel ``c`` of the image is

        ``contrast[c] * object_mask + texture * T_c + noise * (1 + c / 2) * N_c``

    with ``contrast[c] = (-1) ** c * max(0.3, 1 - 0.2 c)`` = ``(1, -0.8, 0.6, -0.4, 0.3, ...)`` (bright in some channels,
    dark in others), ``T_c`` a smooth random texture (white noise blurred by a
    Gaussian of sigma 2, :func:`skimage.filters.gaussian`, scaled to unit
    standard deviation) and ``N_c`` standard white noise, each independent per
    channel; then channel ``c`` is mapped affinely to [0, 1] by fixed bounds
    ``min(0, contrast[c]) - 3 s_c`` and ``max(0, contrast[c]) + 3 s_c``
    (``s_c`` the standard deviation of texture plus noise) and clipped, so
    that the intensities do not depend on the volume's size (a network trained
    on small patches sees the same intensities in large volumes).

    Why it needs context: all classes share the same intensity in every
    channel, so the best voxel-by-voxel rule (:func:`fit_voxelwise_classifier`)
    can at most tell object from background and must give all objects one
    class; a voxel's class is decided by the extent of its object along the
    three axes (thin in 0, 1 or 2 directions), which a network reads from
    a neighbourhood of about 10 voxels.

    Args:
        n: volumes; shape: ``(D, H, W)``, each >= 12 (any, not necessarily cubic);
        channels: input channels C >= 1; num_classes: 1..3 foreground classes;
        num_objs: objects per volume; texture, noise: amplitudes >= 0 (relative to
        the object contrast 1 of channel 0); seed: of a ``numpy.random.RandomState``
        (the result is a deterministic function of all arguments).
    Returns:
        images ``(n, C, D, H, W)`` float32 in [0, 1] and labels ``(n, D, H, W)``
        int64 in ``0..num_classes`` (0 = background).
    """
    for name, value, low in (("n", n, 1), ("channels", channels, 1), ("num_classes", num_classes, 1),
                             ("num_objs", num_objs, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {name}={value!r}")
    if num_classes > len(CONTEXT_SHAPES):
        raise ValueError(f"num_classes must be <= {len(CONTEXT_SHAPES)} (one class per shape in "
                         f"{CONTEXT_SHAPES}), got num_classes={num_classes}")
    for name, value in (("texture", texture), ("noise", noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {name}={value!r}")
    dims = _check_shape3d(shape, "shape", low=12)
    x, y = _context_volumes(n, dims, channels, num_classes, num_objs, float(texture), float(noise), seed)
    return x.clone(), y.clone()


def _context_object(kind: str, dims: tuple[int, ...], rs: np.random.RandomState) -> np.ndarray:
    """Boolean mask of one object of ``kind`` (its bounding box), fitting in ``dims``."""
    from skimage.morphology import ball

    if kind == "ball":
        return ball(int(rs.randint(3, 5))).astype(bool)
    thin = [int(rs.randint(2, 4)) for _ in range(3)]
    axis = int(rs.randint(3))
    if kind == "rod":  # long along `axis`
        thin[axis] = int(rs.randint(10, 15))
    else:  # plate: thin along `axis`, wide along the others
        thin = [thin[axis] if a == axis else int(rs.randint(7, 11)) for a in range(3)]
    return np.ones([min(e, d - 2) for e, d in zip(thin, dims)], dtype=bool)


@functools.lru_cache(maxsize=4)
def _context_volumes(n: int, dims: tuple[int, int, int], channels: int, num_classes: int, num_objs: int,
                     texture: float, noise: float, seed: int) -> tuple[Tensor, Tensor]:
    """:func:`make_context_volumes` without checks, cached."""
    from skimage.filters import gaussian

    rs = np.random.RandomState(seed)
    contrast = [(-1) ** c * max(0.3, 1.0 - 0.2 * c) for c in range(channels)]
    images = np.empty((n, channels, *dims), dtype=np.float32)
    labels = np.zeros((n, *dims), dtype=np.int64)
    for i in range(n):
        lab = labels[i]
        occupied = np.zeros(dims, dtype=bool)
        for j in range(num_objs):
            k = 1 + j % num_classes
            obj = _context_object(CONTEXT_SHAPES[k - 1], dims, rs)
            for _ in range(50):
                corner = [int(rs.randint(1, d - e)) for d, e in zip(dims, obj.shape)]
                box = tuple(slice(c, c + e) for c, e in zip(corner, obj.shape))
                margin = tuple(slice(c - 1, c + e + 1) for c, e in zip(corner, obj.shape))
                if not occupied[margin].any():
                    lab[box][obj] = k
                    occupied[box] |= obj
                    break
        mask = (lab > 0).astype(np.float32)
        for c in range(channels):
            t = gaussian(rs.standard_normal(dims), sigma=2.0)
            t = t / max(float(t.std()), 1e-12)
            img = contrast[c] * mask + texture * t + noise * (1 + c / 2) * rs.standard_normal(dims)
            spread = 3 * math.hypot(texture, noise * (1 + c / 2))
            lo, hi = min(0.0, contrast[c]) - spread, max(0.0, contrast[c]) + spread
            images[i, c] = np.clip((img - lo) / (hi - lo), 0, 1)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _default_bins(channels: int) -> int:
    return max(2, min(100, int(20000 ** (1 / channels))))


def _bin_indices(images: Tensor, bins: int) -> tuple[Tensor, ...]:
    """Per channel, the bin of every voxel: ``C`` tensors ``(n, *S)``."""
    q = (images.clamp(0, 1) * (bins - 1)).round().long()
    return tuple(q[:, c] for c in range(images.shape[1]))


def fit_voxelwise_classifier(images: Tensor, labels: Tensor, num_classes: int, bins: int | None = None) -> Tensor:
    """The best classifier that sees one voxel at a time, fitted on ``(images, labels)``.

    The intensities of each of the ``C`` channels, in [0, 1], are cut into
    ``bins`` equal bins and each cell of the joint ``C``-dimensional histogram
    gets the most frequent label of the training voxels in it (the Bayes rule
    of the binned intensities; empty cells say background).  Returns the
    lookup table ``(bins,) * C`` for :func:`apply_voxelwise_classifier`; a
    baseline that ignores every neighbourhood.

    Args:
        images: ``(n, C, *S)`` in [0, 1]; labels: ``(n, *S)`` in ``0..num_classes``.
        bins: per channel; default 100 for one or two channels, fewer for more
            (``int(20000 ** (1 / C))``: about 20 000 cells or fewer).
    """
    if images.dim() < 3 or images.shape[0] != labels.shape[0] or images.shape[2:] != labels.shape[1:]:
        raise ValueError(f"need images (n, C, *S) and labels (n, *S), got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    c = images.shape[1]
    bins = _default_bins(c) if bins is None else bins
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got bins={bins!r}")
    idx = torch.zeros(labels.shape, dtype=torch.long)
    for q in _bin_indices(images, bins):
        idx = idx * bins + q
    counts = torch.zeros(bins ** c, num_classes + 1, dtype=torch.long)
    idx = idx.reshape(-1)
    counts.index_put_((idx, labels.reshape(-1)), torch.ones_like(idx), accumulate=True)
    return counts.argmax(1).reshape((bins,) * c)


def apply_voxelwise_classifier(images: Tensor, table: Tensor) -> Tensor:
    """``(n, C, *S) -> (n, *S)`` labels from the lookup table ``(bins,) * C`` of :func:`fit_voxelwise_classifier`."""
    if images.dim() < 3 or images.shape[1] != table.dim():
        raise ValueError(f"the table was fitted on {table.dim()} channel(s); images must be "
                         f"(n, {table.dim()}, *S), got {tuple(images.shape)}")
    return table[_bin_indices(images, table.shape[0])]


# ----------------------------------------------------------------------------- metric
def dice_per_class(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Dice ``2|P∩G| / (|P| + |G|)`` of classes ``1..num_classes`` per volume.

    Args:
        pred, target: integer labels ``(n, *S)`` in ``0..num_classes``.
    Returns:
        ``(n, num_classes)`` float64; ``nan`` where ``target`` has no voxel of
        the class (MONAI's ``ignore_empty=True`` convention).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if pred.dim() < 2:
        raise ValueError(f"expected labels (n, *spatial), got shape {tuple(pred.shape)}")
    n = pred.shape[0]
    p, g = pred.reshape(n, -1), target.reshape(n, -1)
    out = torch.empty(n, num_classes, dtype=torch.float64)
    for k in range(1, num_classes + 1):
        pk, gk = p == k, g == k
        inter = (pk & gk).sum(1).double()
        denom = pk.sum(1).double() + gk.sum(1).double()
        d = 2 * inter / denom.clamp_min(1)
        d[gk.sum(1) == 0] = float("nan")
        out[:, k - 1] = d
    return out


# ----------------------------------------------------------------------------- models
def build_model(kind: str = "iunet", channels: Sequence[int] = (8, 16, 32),
                architecture: Sequence[int] = (2, 2, 2), depth: int = 2, num_classes: int = 3,
                in_channels: int = 1, **iunet_kwargs) -> nn.Module:
    """``1x1 conv -> body -> 1x1 conv`` mapping ``(N, in_channels, *S)`` to ``(N, num_classes + 1, *S)``.

    ``kind='iunet'``: a 3D :class:`iunet_nb.iUNet` body (``channels``,
    ``architecture``, coupling functions of ``depth`` conv blocks, extra
    ``iunet_kwargs`` such as ``me_backend``); it starts as the identity.
    ``kind='unet'``: a :class:`iunet_nb.arch.baselines.UNet` with the same channels and
    levels (``architecture`` residual blocks per side; ``depth`` is ignored).
    Spatial sizes must be multiples of ``2 ** (len(channels) - 1)`` for the U-Net.
    """
    from iunet_nb.arch.baselines import UNet
    from iunet_nb.arch.iunet import iUNet
    from iunet_nb.nn.wrappers import ChannelLift

    if kind not in MODELS:
        raise ValueError(f"kind must be one of {MODELS}, got kind={kind!r}")
    if kind == "iunet":
        body = iUNet(channels=tuple(channels), architecture=tuple(architecture), dim=3,
                     module_kwargs={"depth": depth}, verbose=0, **iunet_kwargs)
        c0 = body.channels[0]
    else:
        body = UNet(list(channels), list(architecture), dim=3)
        c0 = body.channels[0]
    return ChannelLift(body, in_channels, num_classes + 1, c0, dim=3)


def segmentation_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy plus soft Dice (MONAI's ``DiceCELoss``), averaged over the batch.

    ``logits (N, K + 1, *S)``, ``labels (N, *S)`` int64.
    """
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)(logits, labels.unsqueeze(1))


def predict_labels(model: nn.Module, images: Tensor, batch_size: int = 2) -> Tensor:
    """``(n, 1, *S) -> (n, *S)`` argmax labels, in batches, without gradients."""
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            out.append(model(images[i:i + batch_size].to(dev)).argmax(1).cpu())
    return torch.cat(out)


def evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """Mean loss, Dice per class (``dice_1``...) and their mean (``dice``) over the loader's volumes."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses, dices, count = [], [], 0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x.to(dev))
            losses.append(float(segmentation_loss(logits, y.to(dev))) * x.shape[0])
            count += x.shape[0]
            k = logits.shape[1] - 1
            dices.append(dice_per_class(logits.argmax(1).cpu(), y, k))
    model.train(was_training)
    d = torch.cat(dices)
    per_class = torch.nanmean(d, dim=0)
    out = {"loss": sum(losses) / count, "dice": float(per_class.nanmean())}
    out.update({f"dice_{k + 1}": float(v) for k, v in enumerate(per_class)})
    return out


# ----------------------------------------------------------------------------- memory
def measure_volume_step(net: nn.Module, size: int, num_classes: int, batch: int = 1, seed: int = 0):
    """Measure one training step (forward, :func:`segmentation_loss`, backward) on a ``size``^3 volume.

    Returns :class:`iunet_nb.measure.meter.StepMeasurement` (``total_bytes`` =
    parameters + input + step peak).  Native profiler messages are silenced.
    """
    from iunet_nb.measure.meter import measure_step
    from iunet_nb.notebook.helpers import quiet_native_stderr

    g = torch.Generator().manual_seed(seed)
    dev = next(net.parameters()).device
    x = torch.rand(batch, 1, size, size, size, generator=g).to(dev)
    y = torch.randint(0, num_classes + 1, (batch, size, size, size), generator=g).to(dev)
    with quiet_native_stderr():
        return measure_step(net, x, lambda out: segmentation_loss(out, y))


def fit_volume_memory(sizes: Sequence[int], totals: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``total = a + b * size**3`` through measured points; returns ``(a, b)``.

    Needs at least two distinct sizes.
    """
    if len(set(int(v) for v in sizes)) < 2 or len(sizes) != len(totals):
        raise ValueError(f"need >= 2 distinct sizes with one total each, got sizes={list(sizes)}")
    v = np.asarray(sizes, dtype=float) ** 3
    A = np.stack([np.ones_like(v), v], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, np.asarray(totals, dtype=float), rcond=None)
    return float(a), float(b)


def largest_volume(net: nn.Module, budget_bytes: float, num_classes: int, fit_sizes: Sequence[int] = (32, 40),
                   multiple: int = 4, max_checks: int = 6) -> dict:
    """Largest cube edge (a multiple of ``multiple``) whose training step fits in ``budget_bytes``.

    1. measure steps (batch 1) at ``fit_sizes`` and fit ``total = a + b s^3``
       (:func:`fit_volume_memory`);
    2. predict the largest edge with ``a + b s^3 <= budget``;
    3. verify with a measured step there, then walk in steps of ``multiple``:
       up while the next edge still fits, down until one fits (at most
       ``max_checks`` measured steps).

    ``total`` is :attr:`iunet_nb.measure.meter.StepMeasurement.total_bytes`
    (parameters + input + step peak).  Returns a dict: ``size`` (largest
    verified edge, 0 if none), ``predicted_size``, ``predicted_bytes``,
    ``measured_bytes`` (at ``size``), ``fit`` ``(a, b)``, ``fit_points`` and
    ``checks`` (lists of ``(edge, total)``).
    """
    if not budget_bytes > 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes!r}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple!r}")
    points = [(int(s), measure_volume_step(net, int(s), num_classes).total_bytes) for s in fit_sizes]
    a, b = fit_volume_memory([p[0] for p in points], [p[1] for p in points])
    edge = ((budget_bytes - a) / b) ** (1 / 3) if budget_bytes > a and b > 0 else 0.0
    predicted = max(multiple, int(edge // multiple) * multiple)
    known = dict(points)
    checks: list[tuple[int, int]] = []

    def fits(size: int) -> bool:
        total = measure_volume_step(net, size, num_classes).total_bytes
        checks.append((size, total))
        known[size] = total
        return total <= budget_bytes

    size, best = predicted, 0
    if fits(size):
        best = size
        while len(checks) < max_checks and fits(size + multiple):
            size += multiple
            best = size
    else:
        while len(checks) < max_checks and size > multiple:
            size -= multiple
            if fits(size):
                best = size
                break
    return {"size": best, "predicted_size": predicted, "predicted_bytes": a + b * predicted ** 3,
            "measured_bytes": known[best] if best else None, "fit": (a, b), "fit_points": points,
            "checks": checks}


# ----------------------------------------------------------------------------- task
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``segmentation3d`` task (defaults: minutes on a laptop CPU)."""
    g = parser.add_argument_group("task 'segmentation3d' (synthetic 3D volumes, Dice)")
    g.add_argument("--arch", choices=MODELS, default="iunet", help="body of the network")
    g.add_argument("--data", choices=DATA, default="spheres",
                   help="'spheres': MONAI's spheres, class = intensity (make_volumes); 'context': equal-"
                        "intensity balls, rods and plates, class = shape (make_context_volumes)")
    g.add_argument("--size", type=positive_int, default=32, help="edge of the cubic volumes (voxels)")
    g.add_argument("--shape", type=positive_int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="volume shape instead of the cube --size (any box; the U-Net needs multiples "
                        "of 2 ** (levels - 1))")
    g.add_argument("--in-channels", type=positive_int, default=1,
                   help="input channels (more than 1 only with --data context)")
    g.add_argument("--n-train", type=positive_int, default=24, help="training volumes")
    g.add_argument("--n-val", type=positive_int, default=8, help="held-out volumes")
    g.add_argument("--classes", type=positive_int, default=3, help="foreground classes")
    g.add_argument("--noise", type=float, default=0.6,
                   help="MONAI noise_max: background noise up to noise * classes intensity levels")
    g.add_argument("--objects", type=positive_int, default=10, help="objects per volume")
    g.add_argument("--texture", type=float, default=0.4,
                   help="--data context: amplitude of the smooth background texture")
    g.add_argument("--context-noise", type=float, default=0.3,
                   help="--data context: amplitude of the white noise (channel c: times 1 + c / 2)")
    g.add_argument("--channels", type=positive_int, nargs="+", default=[8, 16, 32])
    g.add_argument("--architecture", type=positive_int, nargs="+", default=[2, 2, 2],
                   help="blocks per side and level (iUNet: couplings; U-Net: residual blocks)")
    g.add_argument("--depth", type=positive_int, default=2, help="conv blocks per iUNet coupling function")


def datasets(opts: argparse.Namespace) -> tuple[TensorDataset, TensorDataset]:
    """Training and held-out volumes (disjoint random streams derived from ``opts.seed``).

    ``--data spheres`` (default): :func:`make_volumes`; ``--data context``:
    :func:`make_context_volumes` with ``--in-channels``, ``--texture`` and
    ``--context-noise``.  ``--shape D H W`` replaces the cube ``--size``.
    """
    data = getattr(opts, "data", "spheres")
    in_channels = getattr(opts, "in_channels", 1)
    shape = getattr(opts, "shape", None)
    if data == "context":
        if opts.classes > len(CONTEXT_SHAPES):
            raise ValueError(f"--data context has {len(CONTEXT_SHAPES)} shape classes {CONTEXT_SHAPES}: use "
                             f"--classes 1..{len(CONTEXT_SHAPES)}, got --classes {opts.classes}")
        kw = dict(shape=tuple(shape) if shape else (opts.size,) * 3, channels=in_channels,
                  num_classes=opts.classes, num_objs=opts.objects, texture=opts.texture,
                  noise=opts.context_noise)
        train = make_context_volumes(opts.n_train, seed=2 * opts.seed, **kw)
        val = make_context_volumes(opts.n_val, seed=2 * opts.seed + 1, **kw)
        return TensorDataset(*train), TensorDataset(*val)
    if data != "spheres":
        raise ValueError(f"--data must be one of {DATA}, got {data!r}")
    if in_channels != 1:
        raise ValueError(f"--data spheres has one input channel: use --in-channels 1, or --data context "
                         f"for {in_channels} channels")
    kw = dict(size=opts.size, num_classes=opts.classes, noise=opts.noise, num_objs=opts.objects)
    if shape:
        kw["shape"] = tuple(shape)
    train = make_volumes(opts.n_train, seed=2 * opts.seed, **kw)
    val = make_volumes(opts.n_val, seed=2 * opts.seed + 1, **kw)
    return TensorDataset(*train), TensorDataset(*val)


def model(opts: argparse.Namespace) -> nn.Module:
    """The network chosen by ``--arch`` for ``--in-channels`` inputs (the iUNet uses the loop's ``--engine``)."""
    if len(opts.channels) != len(opts.architecture):
        raise ValueError(f"--channels and --architecture need one value per level, got "
                         f"{opts.channels} and {opts.architecture}")
    extra = engine_kwargs(getattr(opts, "engine", "fused")) if opts.arch == "iunet" else {}
    return build_model(opts.arch, opts.channels, opts.architecture, opts.depth, opts.classes,
                       in_channels=getattr(opts, "in_channels", 1), **extra)


def _loss(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    x, y = batch
    return segmentation_loss(net(x), y)


#: the task's functions, in the order of :class:`~iunet_nb.apps.task.Task`'s fields
TASK = Task("segmentation3d", "3D segmentation of MONAI's synthetic spheres: iUNet or U-Net, Dice per class",
            datasets, model, _loss, evaluate, add_arguments)
