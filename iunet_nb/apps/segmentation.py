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
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from iunet_nb.apps.task import Task, engine_kwargs, positive_int

__all__ = [
    "make_volumes",
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


# ----------------------------------------------------------------------------- data
def make_volumes(n: int, size: int = 32, num_classes: int = 3, noise: float = 0.6, num_objs: int = 10,
                 rad_min: int = 3, rad_max: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` noisy volumes and their labels from MONAI's ``create_test_image_3d``.

    Returns:
        images: ``(n, 1, size, size, size)`` float32 in [0, 1];
        labels: ``(n, size, size, size)`` int64 in ``0..num_classes`` (0 = background).

    Deterministic in ``seed`` (a ``numpy.random.RandomState``).  ``rad_max``
    defaults to ``size // 4`` (MONAI needs ``size > 2 * rad_max``).
    """
    for name, value, low in (("n", n, 1), ("size", size, 8), ("num_classes", num_classes, 1),
                             ("num_objs", num_objs, 1), ("rad_min", rad_min, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {name}={value!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise:
        raise ValueError(f"noise must be >= 0 (0 = no noise, 1 = up to the top class), got noise={noise!r}")
    rad_max = size // 4 if rad_max is None else rad_max
    if not rad_min < rad_max < size / 2:
        raise ValueError(
            f"need rad_min < rad_max < size / 2, got rad_min={rad_min}, rad_max={rad_max}, size={size}")
    x, y = _volumes(n, size, num_classes, float(noise), num_objs, rad_min, rad_max, seed)
    return x.clone(), y.clone()


@functools.lru_cache(maxsize=4)
def _volumes(n: int, size: int, num_classes: int, noise: float, num_objs: int, rad_min: int, rad_max: int,
             seed: int) -> tuple[Tensor, Tensor]:
    """:func:`make_volumes` without checks, cached (a notebook and the loop build the same data)."""
    from monai.data.synthetic import create_test_image_3d

    rs = np.random.RandomState(seed)
    images, labels = [], []
    for _ in range(n):
        img, lab = create_test_image_3d(size, size, size, num_objs=num_objs, rad_max=rad_max,
                                        rad_min=rad_min, noise_max=noise, num_seg_classes=num_classes,
                                        random_state=rs)
        images.append(img)
        labels.append(lab)
    x = torch.from_numpy(np.stack(images)).float().unsqueeze(1)
    y = torch.from_numpy(np.stack(labels)).long()
    return x, y


def fit_voxelwise_classifier(images: Tensor, labels: Tensor, num_classes: int, bins: int = 100) -> Tensor:
    """The best classifier that sees one voxel at a time, fitted on ``(images, labels)``.

    Intensities in [0, 1] are cut into ``bins`` equal bins and each bin gets the
    most frequent label of the training voxels in it (the Bayes rule of the
    binned intensity).  Returns the lookup table ``(bins,)`` for
    :func:`apply_voxelwise_classifier`; a baseline that ignores every
    neighbourhood.

    Args:
        images: ``(n, 1, *S)`` in [0, 1]; labels: ``(n, *S)`` in ``0..num_classes``.
    """
    idx = (images[:, 0].clamp(0, 1) * (bins - 1)).round().long().reshape(-1)
    counts = torch.zeros(bins, num_classes + 1, dtype=torch.long)
    counts.index_put_((idx, labels.reshape(-1)), torch.ones_like(idx), accumulate=True)
    return counts.argmax(1)


def apply_voxelwise_classifier(images: Tensor, table: Tensor) -> Tensor:
    """``(n, 1, *S) -> (n, *S)`` labels from the lookup table of :func:`fit_voxelwise_classifier`."""
    bins = table.shape[0]
    return table[(images[:, 0].clamp(0, 1) * (bins - 1)).round().long()]


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
    g.add_argument("--size", type=positive_int, default=32, help="edge of the cubic volumes (voxels)")
    g.add_argument("--n-train", type=positive_int, default=24, help="training volumes")
    g.add_argument("--n-val", type=positive_int, default=8, help="held-out volumes")
    g.add_argument("--classes", type=positive_int, default=3, help="foreground classes")
    g.add_argument("--noise", type=float, default=0.6,
                   help="MONAI noise_max: background noise up to noise * classes intensity levels")
    g.add_argument("--objects", type=positive_int, default=10, help="spheres per volume")
    g.add_argument("--channels", type=positive_int, nargs="+", default=[8, 16, 32])
    g.add_argument("--architecture", type=positive_int, nargs="+", default=[2, 2, 2],
                   help="blocks per side and level (iUNet: couplings; U-Net: residual blocks)")
    g.add_argument("--depth", type=positive_int, default=2, help="conv blocks per iUNet coupling function")


def datasets(opts: argparse.Namespace) -> tuple[TensorDataset, TensorDataset]:
    """Training and held-out volumes (disjoint random streams derived from ``opts.seed``)."""
    kw = dict(size=opts.size, num_classes=opts.classes, noise=opts.noise, num_objs=opts.objects)
    train = make_volumes(opts.n_train, seed=2 * opts.seed, **kw)
    val = make_volumes(opts.n_val, seed=2 * opts.seed + 1, **kw)
    return TensorDataset(*train), TensorDataset(*val)


def model(opts: argparse.Namespace) -> nn.Module:
    """The network chosen by ``--arch`` (the iUNet uses the loop's ``--engine``)."""
    if len(opts.channels) != len(opts.architecture):
        raise ValueError(f"--channels and --architecture need one value per level, got "
                         f"{opts.channels} and {opts.architecture}")
    extra = engine_kwargs(getattr(opts, "engine", "fused")) if opts.arch == "iunet" else {}
    return build_model(opts.arch, opts.channels, opts.architecture, opts.depth, opts.classes, **extra)


def _loss(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    x, y = batch
    return segmentation_loss(net(x), y)


#: the task's functions, in the order of :class:`~iunet_nb.apps.task.Task`'s fields
TASK = Task("segmentation3d", "3D segmentation of MONAI's synthetic spheres: iUNet or U-Net, Dice per class",
            datasets, model, _loss, evaluate, add_arguments)
