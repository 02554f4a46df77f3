"""Task ``ct``: learned post-processing of sparse-angle, noisy CT reconstructions (paper, Table 2).

Data: foam phantoms and their filtered back-projections (:mod:`iunet_nb.apps.phantoms`), in 2D
(default) or 3D (``--dim 3``).  Model: ``FBP -> FBP + project(net(lift(FBP)))`` (1x1 convolutions,
:class:`iunet_nb.nn.wrappers.ChannelLift`) where ``net``
is an iUNet (``--arch iunet``) or the U-Net baseline of :mod:`iunet_nb.arch.baselines`
(``--arch unet``) with its width chosen so that both have about the same number of parameters.
The projection starts at zero, so both models start as the identity (prediction = FBP).
Loss: mean squared error to the phantom.  Metrics (held-out phantoms): PSNR and SSIM
(scikit-image, data range 1 = the phantom's range) of the prediction and of the FBP itself.

    python -m iunet_nb.train ct --epochs 10 --arch iunet
    python -m iunet_nb.train ct --dim 3 --size 64 --channels 8 16 32 64 --batch-size 2
"""
from __future__ import annotations

import argparse
import functools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from iunet_nb.arch.baselines import UNet
from iunet_nb.arch.iunet import iUNet
from iunet_nb.nn.wrappers import ChannelLift
from iunet_nb.apps.phantoms import foam_phantom, simulate_fbp
from iunet_nb.apps.task import Task, engine_kwargs, positive_int

__all__ = ["TASK", "post_processor", "build_model", "make_data", "image_metrics", "matched_unet_width",
           "predict"]

def post_processor(body: nn.Module, channels: int, dim: int) -> ChannelLift:
    """``x -> x + project(body(lift(x)))`` for ``(N, 1, *spatial)`` images.

    :class:`iunet_nb.nn.wrappers.ChannelLift` with ``residual=True``: 1x1 convolutions from 1 to
    ``channels`` channels and back, the projection zero-initialised (the model starts as the
    identity: prediction = FBP).
    """
    return ChannelLift(body, 1, 1, channels, dim=dim, residual=True)


def _iunet(channels: Sequence[int], architecture: Sequence[int], dim: int, engine: str) -> iUNet:
    return iUNet(channels=tuple(channels), architecture=tuple(architecture), dim=dim, verbose=0,
                 **engine_kwargs(engine))


def _unet_channels(width: int, levels: int) -> list[int]:
    return [width * 2 ** i for i in range(levels)]


def _parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.lru_cache(maxsize=32)
def matched_unet_width(channels: tuple[int, ...], architecture: tuple[int, ...], dim: int) -> int:
    """The U-Net base width ``w`` (channels ``w, 2w, 4w, ...``) whose post-processor has the
    parameter count closest to the iUNet post-processor's."""
    with torch.random.fork_rng():
        target = _parameters(post_processor(_iunet(channels, architecture, dim, "fused"), channels[0], dim))
        counts = {w: _parameters(post_processor(UNet(_unet_channels(w, len(channels)), architecture, dim),
                                               w, dim))
                  for w in range(1, 2 * channels[0] + 1)}
    return min(counts, key=lambda w: abs(counts[w] - target))


def build_model(opts: argparse.Namespace) -> ChannelLift:
    """The post-processor for ``opts.arch`` (``'iunet'`` or ``'unet'``), see the module docstring."""
    channels, architecture = tuple(opts.channels), tuple(opts.architecture)
    if len(channels) != len(architecture):
        raise ValueError(f"--channels {list(channels)} and --architecture {list(architecture)} need the "
                         "same number of levels")
    factor = 2 ** (len(channels) - 1)
    if opts.size % factor:
        raise ValueError(f"--size {opts.size} must be divisible by 2**(levels-1) = {factor} "
                         f"({len(channels)} levels)")
    if opts.arch == "iunet":
        return post_processor(_iunet(channels, architecture, opts.dim, opts.engine), channels[0], opts.dim)
    width = opts.unet_width or matched_unet_width(channels, architecture, opts.dim)
    return post_processor(UNet(_unet_channels(width, len(channels)), architecture, opts.dim), width, opts.dim)


@functools.lru_cache(maxsize=4)
def make_data(dim: int, size: int, n: int, angles: int, photons: float, seed: int, split: int
              ) -> tuple[Tensor, Tensor]:
    """``n`` phantoms and their FBPs, each ``(n, 1, *(size,) * dim)`` float32 (cached).

    Phantom ``i`` of split ``split`` (0: train, 1: validation) uses the random stream
    ``SeedSequence([seed, split, i])``: the splits never share a phantom, and the data do not
    depend on the order in which they are made.
    """
    phantoms, fbps = [], []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([seed, split, i]))
        phantom = foam_phantom(size, dim, seed=rng)
        phantoms.append(phantom)
        fbps.append(simulate_fbp(phantom, angles, photons if photons > 0 else None, seed=rng))
    as_tensor = lambda a: torch.from_numpy(np.stack(a)[:, None]).float()  # noqa: E731
    return as_tensor(fbps), as_tensor(phantoms)


def _datasets(opts: argparse.Namespace) -> tuple[TensorDataset, TensorDataset]:
    common = (opts.dim, opts.size)
    rest = (opts.angles, float(opts.photons), opts.data_seed)
    train = make_data(*common, opts.n_train, *rest, 0)
    val = make_data(*common, opts.n_val, *rest, 1)
    return TensorDataset(*train), TensorDataset(*val)


def _loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    fbp, phantom = batch
    return F.mse_loss(model(fbp), phantom)


def image_metrics(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """PSNR (dB) and SSIM of one image / volume against the phantom, data range 1."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    prediction = prediction.astype(np.float64)
    truth = truth.astype(np.float64)
    return {"psnr": float(peak_signal_noise_ratio(truth, prediction, data_range=1.0)),
            "ssim": float(structural_similarity(truth, prediction, data_range=1.0))}


@torch.no_grad()
def predict(model: nn.Module, fbp: Tensor, batch_size: int = 8) -> Tensor:
    """The model's output for ``fbp`` ``(N, 1, *spatial)``, in batches, on the model's device (CPU out)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.cat([model(fbp[i:i + batch_size].to(device)).cpu() for i in range(0, len(fbp), batch_size)])
    model.train(was_training)
    return out


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """Mean MSE, PSNR and SSIM of the model and of the FBP on the loader's images."""
    device = next(model.parameters()).device
    rows = []
    for fbp, phantom in loader:
        prediction = model(fbp.to(device)).cpu()
        for p, f, t in zip(prediction.numpy()[:, 0], fbp.numpy()[:, 0], phantom.numpy()[:, 0]):
            m, b = image_metrics(p, t), image_metrics(f, t)
            rows.append({"mse": float(np.mean((p - t) ** 2)), **m,
                         "psnr_fbp": b["psnr"], "ssim_fbp": b["ssim"]})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("task 'ct' (learned FBP post-processing)")
    group.add_argument("--arch", choices=("iunet", "unet"), default="iunet", help="network")
    group.add_argument("--dim", type=int, choices=(2, 3), default=2, help="2D images or 3D volumes")
    group.add_argument("--size", type=positive_int, default=64, help="pixels per side")
    group.add_argument("--n-train", type=positive_int, default=128, help="training phantoms")
    group.add_argument("--n-val", type=positive_int, default=16, help="held-out phantoms")
    group.add_argument("--angles", type=positive_int, default=32,
                       help="projection angles over 180 degrees (undersampled: fewer than size)")
    group.add_argument("--photons", type=_non_negative_float, default=1e4,
                       help="incident photons per detector pixel (Poisson noise); 0: no noise")
    group.add_argument("--data-seed", type=int, default=0, help="seed of the phantoms and the noise")
    group.add_argument("--channels", type=positive_int, nargs="+", default=[8, 16, 32, 64],
                       help="iUNet channels per level (the first is the paper's 'channel blow-up')")
    group.add_argument("--architecture", type=int, nargs="+", default=[2, 2, 2, 2],
                       help="coupling layers (iUNet) / residual blocks (U-Net) per side and level")
    group.add_argument("--unet-width", type=int, default=0,
                       help="U-Net channels at level 0 (0: match the iUNet's parameter count)")


TASK = Task(
    name="ct",
    description="Learned post-processing of sparse-angle, noisy FBP reconstructions of foam phantoms "
                "(paper, Table 2)",
    datasets=_datasets,
    model=build_model,
    loss=_loss,
    evaluate=_evaluate,
    add_arguments=_add_arguments,
)
