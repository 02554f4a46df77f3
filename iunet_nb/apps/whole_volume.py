"""Whole volumes at inference: a network trained on patches predicts volumes larger than any patch.

Two ways, compared by :func:`compare_whole_volume`:

sliding window
    MONAI's :func:`monai.inferers.sliding_window_inference` with the network as
    its predictor: windows of ``roi_size`` (each a multiple of the iUNet's
    :attr:`~iunet_nb.iUNet.downsampling_factors`, so that no window is padded
    inside the network), overlapping by ``overlap`` and blended with
    ``mode`` weights (``'constant'``, MONAI's default, or ``'gaussian'``).  Memory: one window's
    forward plus the volume-sized output buffers MONAI accumulates into.
whole volume
    One forward of the whole volume (the iUNet pads sizes that are not
    multiples of its downsampling factors itself and crops the output back).
    Memory grows with the volume.

Inference memory is measured with :func:`iunet_nb.measure.meter.measure_forward`
(the step meters applied to a ``torch.no_grad()`` forward; on CPU the
profiler's allocator events).  :mod:`iunet_nb.measure.predict` has **no
inference estimate**: it predicts training steps only.  Its training-step
prediction for the same input is reported beside the measurement, labelled as
such: it is not an estimate of inference (at small volumes it is even below
the measured inference peak, which the meters see including convolution
workspaces the step predictor folds into its calibrated constants).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from iunet_nb.apps.segmentation import dice_per_class

__all__ = [
    "downsampling_factors",
    "check_roi_size",
    "sliding_window_logits",
    "whole_volume_logits",
    "compare_whole_volume",
]

BLEND_MODES = ("constant", "gaussian")


def _body(model: nn.Module) -> nn.Module:
    """The body of a :class:`~iunet_nb.nn.wrappers.ChannelLift`, else the model itself."""
    return getattr(model, "body", model)


def downsampling_factors(model: nn.Module) -> tuple[int, ...]:
    """Per spatial dimension, the multiple that window sizes must be for ``model``.

    An iUNet (or a :class:`~iunet_nb.nn.wrappers.ChannelLift` around one):
    its :attr:`downsampling_factors`; the U-Net baseline
    (:class:`iunet_nb.arch.baselines.UNet`): ``2 ** (levels - 1)`` in every
    dimension (3D); anything else: 1.
    """
    body = _body(model)
    factors = getattr(body, "downsampling_factors", None)
    if factors is not None:
        return tuple(int(f) for f in factors)
    channels = getattr(body, "channels", None)
    if channels is not None:
        return (2 ** (len(channels) - 1),) * 3
    return (1, 1, 1)


def check_roi_size(model: nn.Module, roi_size: Sequence[int]) -> tuple[int, ...]:
    """``roi_size`` as a tuple of ints, each a positive multiple of the model's downsampling factor.

    Raises ``ValueError`` naming ``roi_size`` and the nearest sizes that work.
    """
    factors = downsampling_factors(model)
    roi = tuple(roi_size)
    if len(roi) != len(factors) or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in roi):
        raise ValueError(f"roi_size must be {len(factors)} positive ints, got roi_size={roi_size!r}")
    if any(r % f for r, f in zip(roi, factors)):
        up = tuple(-(-r // f) * f for r, f in zip(roi, factors))
        raise ValueError(f"roi_size={roi} must be a multiple of the model's downsampling factors {factors} "
                         f"in every dimension (so that no window is padded inside the network); use e.g. "
                         f"roi_size={up}")
    return roi


def _check_images(images: Any) -> None:
    if not isinstance(images, Tensor) or images.dim() != 5:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor (n, C, D, H, W), got {shape}")


class _SlidingWindow(nn.Module):
    """``sliding_window_inference`` as a module (so that the meters can run it)."""

    def __init__(self, model: nn.Module, roi_size: tuple[int, ...], overlap: float, mode: str,
                 sw_batch_size: int) -> None:
        super().__init__()
        self.model = model
        self.roi_size, self.overlap, self.mode, self.sw_batch_size = roi_size, overlap, mode, sw_batch_size

    def forward(self, x: Tensor) -> Tensor:
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(x, self.roi_size, self.sw_batch_size, self.model,
                                        overlap=self.overlap, mode=self.mode, padding_mode="constant")


def _sliding(model: nn.Module, roi_size: Sequence[int], overlap: float, mode: str,
             sw_batch_size: int) -> _SlidingWindow:
    roi = check_roi_size(model, roi_size)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1) (fraction of a window shared with its neighbour), "
                         f"got overlap={overlap!r}")
    if mode not in BLEND_MODES:
        raise ValueError(f"mode must be one of {BLEND_MODES}, got mode={mode!r}")
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be an int >= 1, got sw_batch_size={sw_batch_size!r}")
    return _SlidingWindow(model, roi, float(overlap), mode, sw_batch_size)


def sliding_window_logits(model: nn.Module, images: Tensor, roi_size: Sequence[int], overlap: float = 0.25,
                          mode: str = "constant", sw_batch_size: int = 1) -> Tensor:
    """``(n, C, D, H, W) -> (n, K + 1, D, H, W)`` logits from MONAI's ``sliding_window_inference``.

    ``roi_size`` (the training patch shape, typically) must be a multiple of
    the model's downsampling factors (:func:`check_roi_size`); volumes smaller
    than a window are padded by MONAI and cropped back.  Runs under
    ``torch.no_grad()`` on the model's device; returns CPU logits.
    """
    _check_images(images)
    sw = _sliding(model, roi_size, overlap, mode, sw_batch_size)
    dev = next(model.parameters()).device
    with torch.no_grad():
        return sw(images.to(dev)).cpu()


def whole_volume_logits(model: nn.Module, images: Tensor, batch_size: int = 1) -> Tensor:
    """``(n, C, D, H, W) -> (n, K + 1, D, H, W)`` logits of one forward per ``batch_size`` whole volumes."""
    _check_images(images)
    dev = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([model(images[i:i + batch_size].to(dev)).cpu()
                          for i in range(0, images.shape[0], batch_size)])


def _mean_dice(pred: Tensor, labels: Tensor, num_classes: int) -> tuple[float, list[float]]:
    per_class = torch.nanmean(dice_per_class(pred, labels, num_classes), 0)
    return float(per_class.nanmean()), [float(v) for v in per_class]


def _training_prediction(model: nn.Module, spatial: Sequence[int]) -> dict | None:
    """The predictor's training-step prediction for the iUNet body on one volume (None for other bodies)."""
    from iunet_nb.arch.iunet import iUNet
    from iunet_nb.measure.predict import predict_step_memory

    body = _body(model)
    if not isinstance(body, iUNet):
        return None
    mode = "conventional" if body.disable_custom_gradient else body.me_backend
    p = predict_step_memory(body, (1, body.channels[0], *spatial), mode=mode)
    return {"mode": mode, "total_bytes": int(p.total), "activations_bytes": int(p.activations),
            "note": "training-step prediction of the iUNet body (forward + backward) for one volume; "
                    "the predictor has no inference estimate"}


def compare_whole_volume(model: nn.Module, images: Tensor, labels: Tensor, roi_size: Sequence[int],
                         overlap: float = 0.25, mode: str = "constant", sw_batch_size: int = 1,
                         measure: bool = True) -> dict[str, Any]:
    """Predict ``images`` by sliding windows and whole at once; Dice and inference memory of both.

    Args:
        model: maps ``(N, C, *S)`` to ``(N, K + 1, *S)`` logits (e.g.
            :func:`iunet_nb.apps.segmentation.build_model`).
        images: ``(n, C, D, H, W)`` volumes (larger than ``roi_size`` is the point);
        labels: ``(n, D, H, W)`` in ``0..K``.
        roi_size, overlap, mode, sw_batch_size: of :func:`sliding_window_logits`.
        measure: also measure the inference memory of both ways on the first
            volume (:func:`iunet_nb.measure.meter.measure_forward`).
    Returns:
        dict with ``sliding`` and ``whole`` (``(n, D, H, W)`` argmax labels),
        ``dice_sliding`` / ``dice_whole`` (mean over classes of the per-class
        Dice averaged over volumes) with ``*_per_class`` lists,
        ``agreement`` (fraction of voxels where both ways agree), and with
        ``measure``: ``memory_sliding`` / ``memory_whole``
        (:class:`~iunet_nb.measure.meter.ForwardMeasurement` of one volume),
        ``predicted`` (:func:`_training_prediction`: the predictor's
        *training-step* estimate for one whole volume, or None) and
        ``predicted_inference_bytes`` (always None: no inference estimate).
    """
    _check_images(images)
    if labels.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"labels must be (n, D, H, W) = {(images.shape[0], *images.shape[2:])} for images "
                         f"{tuple(images.shape)}, got {tuple(labels.shape)}")
    sw = _sliding(model, roi_size, overlap, mode, sw_batch_size)
    sliding = sliding_window_logits(model, images, sw.roi_size, overlap, mode, sw_batch_size)
    whole = whole_volume_logits(model, images)
    k = sliding.shape[1] - 1
    pred_s, pred_w = sliding.argmax(1), whole.argmax(1)
    d_s, pc_s = _mean_dice(pred_s, labels, k)
    d_w, pc_w = _mean_dice(pred_w, labels, k)
    out: dict[str, Any] = {
        "sliding": pred_s, "whole": pred_w, "dice_sliding": d_s, "dice_whole": d_w,
        "dice_sliding_per_class": pc_s, "dice_whole_per_class": pc_w,
        "agreement": float((pred_s == pred_w).double().mean()),
        "roi_size": sw.roi_size, "volume_shape": tuple(images.shape[2:]),
        "windows_per_volume": _window_count(images.shape[2:], sw.roi_size, sw.overlap),
    }
    if measure:
        from iunet_nb.measure.meter import measure_forward

        dev = next(model.parameters()).device
        x = images[:1].to(dev)
        _, out["memory_sliding"] = measure_forward(sw, x)
        _, out["memory_whole"] = measure_forward(model, x)
        out["predicted"] = _training_prediction(model, images.shape[2:])
        out["predicted_inference_bytes"] = None
    return out


def _window_count(spatial: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Windows MONAI's scan takes per volume (its ``_get_scan_interval`` rule, for reporting)."""
    count = 1
    for s, r in zip(spatial, roi):
        if s <= r:
            continue
        step = max(int(r * (1 - overlap)), 1)
        count *= math.ceil((s - r) / step) + 1
    return count
