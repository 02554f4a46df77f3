"""An iUNet as a normalizing flow on scikit-learn's 8x8 ``digits`` (the paper's flow experiment, small).

Change of variables (as in the authors' talk "iUNets - Fully invertible U-Nets
for Memory-Constrained Applications", 2020): for a bijection ``z = phi(x)``
with a standard normal ``z``,

    log p(x) = log N(z; 0, I) + log |det d phi / d x|.

Every layer here honours one contract (as FrEIA's modules do):
``forward(x) -> (y, logdet)`` with ``logdet`` of shape ``(N,)``, and
``inverse(y) -> x``.  An iUNet is volume-preserving (additive couplings have
a unit-triangular Jacobian, orthogonal resampling and channel mixing have
``|det| = 1``), so its log-determinant is exactly 0 (:class:`VolumePreserving`);
the flow gets its non-zero log-determinant from :class:`LogitTransform`
(fixed), :class:`ActNorm` (learned per-channel scale) and :class:`AffineCoupling`
(data-dependent scale) layers between the iUNets.

Data: digit pixel values ``v`` in ``0..16`` are dequantized,
``x = (v + u) / 17`` with ``u ~ U[0, 1)^D``; the bits per dimension of
``v + u`` on ``[0, 17)^D`` are ``-log2 p(x) / D + log2(17)``, and the uniform
density on ``[0, 17)^D`` scores exactly ``log2(17) = 4.09`` bits/dim
(:func:`bits_per_dim`).  ``TASK`` is the ``flow`` task of :mod:`iunet_nb.train`.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from iunet_nb.apps.task import Task, engine_kwargs

__all__ = [
    "LEVELS",
    "load_digits_tensor",
    "dequantize",
    "bits_per_dim",
    "LogitTransform",
    "ActNorm",
    "AffineCoupling",
    "VolumePreserving",
    "create_flow_coupling",
    "IUNetFlow",
    "FrEIAFlow",
    "build_freia_realnvp",
    "parameter_count",
    "split_digits",
    "flow_loss",
    "evaluate",
    "to_levels",
    "nearest_neighbours",
    "Neighbours",
    "memorisation_check",
    "TASK",
]

#: number of grey levels of sklearn's digits (pixel values 0..16)
LEVELS = 17


# ----------------------------------------------------------------------------- data
def load_digits_tensor() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits: images ``(1797, 1, 8, 8)`` float32 in ``0..16`` and labels ``(1797,)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (torch.from_numpy(d.images).float().unsqueeze(1), torch.from_numpy(d.target).long())


def dequantize(v: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``(v + u) / 17`` with ``u ~ U[0, 1)`` elementwise: integer levels to ``(0, 1)``, any shape."""
    u = torch.rand(v.shape, generator=generator, dtype=v.dtype).to(v.device)
    return (v + u) / LEVELS


def bits_per_dim(z: Tensor, logdet: Tensor) -> Tensor:
    """Bits per dimension of the dequantized levels ``v + u = 17 x``, per sample ``(N,)``.

    ``z``: the flow's output ``(N, *)`` (standard normal prior), ``logdet``:
    ``log |det dz/dx|`` ``(N,)`` for ``x`` in ``(0, 1)^D``.
    """
    n = z.shape[0]
    flat = z.reshape(n, -1)
    d = flat.shape[1]
    log_prior = -0.5 * (flat ** 2).sum(1) - 0.5 * d * math.log(2 * math.pi)
    log_px = log_prior + logdet
    return -log_px / (d * math.log(2)) + math.log2(LEVELS)


# ----------------------------------------------------------------------------- layers
class LogitTransform(nn.Module):
    """``x in (0, 1) -> logit(a + (1 - 2a) x)``, elementwise, with its log-determinant.

    Maps the bounded data to the real line where a Gaussian prior makes sense.
    """

    def __init__(self, alpha: float = 0.05) -> None:
        super().__init__()
        if not 0 <= alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got alpha={alpha!r}")
        self.alpha = float(alpha)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(s) - torch.log1p(-s)
        ld = (math.log(1 - 2 * self.alpha) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)
        return y, ld

    def inverse(self, y: Tensor) -> Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)


class ActNorm(nn.Module):
    """``y = (x + b) * exp(s)`` per channel; ``logdet = prod(spatial) * sum(s)``.  Starts as the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = (x + self.bias) * torch.exp(self.log_scale)
        ld = self.log_scale.sum() * math.prod(x.shape[2:])
        return y, ld.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


def _subnet(c_in: int, c_out: int, hidden: int) -> nn.Sequential:
    """``conv3 -> ReLU -> conv1 -> ReLU -> conv3`` (2D), last layer zero-initialised."""
    net = nn.Sequential(
        nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
        nn.Conv2d(hidden, c_out, 3, padding=1),
    )
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


class AffineCoupling(nn.Module):
    """``(u, v) -> (v, u * exp(s(v)) + t(v))`` with ``s = clamp * tanh(raw / clamp)``.

    ``u`` = the first ``ceil(C/2)`` channels of ``(N, C, H, W)``; the output puts
    ``v`` first (as :class:`iunet_nb.nn.coupling.AdditiveCoupling`), so stacked
    couplings alternate halves.  ``logdet = sum(s)`` over channels and pixels.
    Starts as the channel swap (zero-initialised last layer).
    """

    def __init__(self, channels: int, hidden: int = 32, clamp: float = 2.0) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"an affine coupling needs channels >= 2, got channels={channels}")
        self.split = math.ceil(channels / 2)
        self.clamp = float(clamp)
        self.net = _subnet(channels - self.split, 2 * self.split, hidden)

    def _scale_shift(self, v: Tensor) -> tuple[Tensor, Tensor]:
        raw_s, t = self.net(v).chunk(2, dim=1)
        return self.clamp * torch.tanh(raw_s / self.clamp), t

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u, v = x[:, : self.split], x[:, self.split:]
        s, t = self._scale_shift(v)
        return torch.cat([v, u * torch.exp(s) + t], 1), s.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        r = y.shape[1] - self.split
        v, w = y[:, :r], y[:, r:]
        s, t = self._scale_shift(v)
        return torch.cat([(w - t) * torch.exp(-s), v], 1)


class VolumePreserving(nn.Module):
    """Wraps a bijection with ``|det J| = 1`` (an iUNet, an orthogonal resampling): ``logdet = 0``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.module(x), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return self.module.inverse(y)


def create_flow_coupling(in_channels: int, dim: int = 2, module_index: int = 0, hidden: int = 32,
                         **coordinates) -> nn.Module:
    """``create_module_fn`` for an iUNet inside a flow: additive coupling with a wide :func:`_subnet`.

    The default iUNet coupling function keeps the channel count of its half
    (2 channels at the finest level here), too narrow for density modelling;
    this one goes through ``hidden`` channels.  Additive: volume-preserving.
    """
    from iunet_nb.nn.coupling import AdditiveCoupling

    if dim != 2:
        raise ValueError(f"the flow's couplings are 2D, got dim={dim}")
    split = math.ceil(in_channels / 2) if module_index % 2 == 0 else in_channels // 2
    return AdditiveCoupling(_subnet(in_channels - split, split, hidden), in_channels, split)


# ----------------------------------------------------------------------------- flows
class _Flow(nn.Module):
    """A sequence of layers with the ``(y, logdet)`` contract; ``x (N, 1, 8, 8) in (0, 1)``."""

    layers: nn.ModuleList

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x (N, 1, H, W)`` in ``(0, 1)`` -> ``z``, ``log |det dz/dx|`` ``(N,)``."""
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's ``z``."""
        return tuple(self._latent)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples ``x = phi^{-1}(T z)`` in ``(0, 1)``, shape ``(n, 1, 8, 8)``."""
        p = next(self.parameters())
        z = torch.randn(n, *self._latent, generator=generator, dtype=p.dtype).to(p.device)
        return self.inverse(temperature * z).clamp(0, 1)


class IUNetFlow(_Flow):
    """logit -> Haar squeeze (1x8x8 -> 4x4x4) -> ``blocks`` x [ActNorm -> iUNet -> AffineCoupling].

    Args:
        blocks: number of iUNet blocks.
        channels, architecture: of each 2D iUNet on ``(N, 4, 4, 4)``
            (default ``(4, 8, 16)``: 4x4 -> 2x2 -> 1x1).
        hidden: width of the coupling subnetworks (iUNet's and affine's).
        alpha: of the :class:`LogitTransform`.
        iunet_kwargs: e.g. ``me_backend`` / ``disable_custom_gradient``.
    """

    def __init__(self, blocks: int = 2, channels: Sequence[int] = (4, 8, 16),
                 architecture: Sequence[int] = (2, 2, 2), hidden: int = 32, alpha: float = 0.05,
                 size: int = 8, **iunet_kwargs) -> None:
        super().__init__()
        from iunet_nb.arch.iunet import iUNet
        from iunet_nb.nn.resampling import InvertibleDownsampling

        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got blocks={blocks}")
        if channels[0] != 4:
            raise ValueError(f"the squeezed digits have 4 channels: channels[0] must be 4, got {channels}")
        layers: list[nn.Module] = [
            LogitTransform(alpha),
            VolumePreserving(InvertibleDownsampling(1, 2, dim=2, init="haar", learnable=False)),
        ]
        for _ in range(blocks):
            body = iUNet(channels=tuple(channels), architecture=tuple(architecture), dim=2,
                         create_module_fn=create_flow_coupling, module_kwargs={"hidden": hidden},
                         verbose=0, **iunet_kwargs)
            layers += [ActNorm(4), VolumePreserving(body), AffineCoupling(4, hidden)]
        self.layers = nn.ModuleList(layers)
        self._latent = (4, size // 2, size // 2)


class FrEIAFlow(_Flow):
    """The RealNVP-style baseline: logit -> a FrEIA ``SequenceINN`` (see :func:`build_freia_realnvp`)."""

    def __init__(self, inn: nn.Module, alpha: float = 0.05, latent: Sequence[int] = (4, 4, 4)) -> None:
        super().__init__()
        self.layers = nn.ModuleList([LogitTransform(alpha), _FrEIALayer(inn)])
        self._latent = tuple(latent)


class _FrEIALayer(nn.Module):
    """A FrEIA invertible network in the ``(y, logdet)`` / ``inverse`` contract."""

    def __init__(self, inn: nn.Module) -> None:
        super().__init__()
        self.inn = inn

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, ld = self.inn(x)
        return z, ld.reshape(x.shape[0]) if torch.is_tensor(ld) else x.new_full((x.shape[0],), float(ld))

    def inverse(self, z: Tensor) -> Tensor:
        x, _ = self.inn(z, rev=True)
        return x


def build_freia_realnvp(blocks: int = 6, hidden: int = 48, alpha: float = 0.05) -> FrEIAFlow:
    """RealNVP with FrEIA: logit -> ``IRevNetDownsampling`` (1x8x8 -> 4x4x4) -> ``blocks`` x
    [``RNVPCouplingBlock`` (two affine couplings) with :func:`_subnet` convolutions -> ``PermuteRandom``].

    FrEIA's ``PermuteRandom`` draws its permutation from NumPy's global generator:
    seed it before building (``seed_everything``).
    """
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    inn = Ff.SequenceINN(1, 8, 8)
    inn.append(Fm.IRevNetDownsampling)
    for _ in range(blocks):
        inn.append(Fm.RNVPCouplingBlock, subnet_constructor=lambda c_in, c_out: _subnet(c_in, c_out, hidden),
                   clamp=2.0)
        inn.append(Fm.PermuteRandom)
    return FrEIAFlow(inn, alpha)


def parameter_count(module: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- task
def flow_loss(model: nn.Module, x: Tensor) -> Tensor:
    """Mean bits/dim of dequantized ``x (N, 1, 8, 8)`` in ``(0, 1)`` (calls ``model(x)``)."""
    z, logdet = model(x)
    return bits_per_dim(z, logdet).mean()


def _loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """Training loss: fresh dequantization noise for the integer levels ``batch[0]``."""
    return flow_loss(model, dequantize(batch[0]))


def evaluate(model: nn.Module, loader: DataLoader, seed: int = 0) -> dict[str, float]:
    """Mean bits/dim over the loader's digits, with dequantization noise fixed by ``seed``."""
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            x = dequantize(batch[0].to(p.dtype), g).to(p.device)
            z, ld = model(x)
            total += float(bits_per_dim(z, ld).sum())
            count += x.shape[0]
    model.train(was_training)
    return {"bpd": total / count}


def split_digits(seed: int = 0, val_fraction: float = 1 / 6) -> tuple[Tensor, Tensor]:
    """The digits' levels ``(N, 1, 8, 8)`` shuffled by ``seed`` and split into training and held-out parts."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    x, _ = load_digits_tensor()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * x.shape[0]))
    return x[perm[n_val:]], x[perm[:n_val]]


# ----------------------------------------------------------------------------- memorisation
def to_levels(x: Tensor) -> Tensor:
    """Flow outputs ``x`` in ``(0, 1)`` on the scale of the digits' levels: ``17 x - 1/2``.

    Inverts :func:`dequantize` on average (``E[(v + u) / 17] = (v + 1/2) / 17``), so a sample
    that reproduces a training digit ``v`` exactly lies at distance 0 from it.
    """
    return x * LEVELS - 0.5


def nearest_neighbours(queries: Tensor, references: Tensor, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """For each query, the nearest reference in L2 over all pixels: ``(distances (Q,), indices (Q,))``.

    ``queries (Q, *)`` and ``references (R, *)`` with the same trailing shape; exact differences
    (no ``|a|^2 - 2ab + |b|^2`` expansion, so an identical image is at distance exactly 0),
    ``chunk`` queries at a time.
    """
    if queries.dim() < 2 or references.dim() < 2 or queries.shape[1:] != references.shape[1:]:
        raise ValueError(f"queries and references must be (N, *) with the same image shape, got "
                         f"queries {tuple(queries.shape)} and references {tuple(references.shape)}")
    if references.shape[0] == 0:
        raise ValueError("references is empty")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got chunk={chunk}")
    q = queries.reshape(queries.shape[0], -1).double()
    r = references.reshape(references.shape[0], -1).double()
    dists, idx = [], []
    for part in q.split(chunk):
        d2 = ((part[:, None, :] - r[None, :, :]) ** 2).sum(-1)
        best = d2.min(1)
        dists.append(best.values.sqrt())
        idx.append(best.indices)
    if not dists:
        return q.new_zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(dists), torch.cat(idx)


@dataclass(frozen=True)
class Neighbours:
    """What :func:`memorisation_check` returns (distances in grey levels, L2 over the 64 pixels).

    Attributes:
        sample_distance: ``(S,)`` each sample's distance to its nearest training digit.
        sample_index: ``(S,)`` that digit's index in ``train``.
        nearest: ``(S, 1, 8, 8)`` those training digits (levels), to show next to the samples.
        test_distance: ``(T,)`` each held-out digit's distance to its nearest training digit:
            the scale of "a new digit of the same kind"; samples much closer than that are copies.
    """

    sample_distance: Tensor
    sample_index: Tensor
    nearest: Tensor
    test_distance: Tensor

    def summary(self) -> dict[str, float]:
        """Medians and minima of both distance sets, and the fraction of samples closer to a
        training digit than the closest held-out digit is."""
        return {
            "sample_median": float(self.sample_distance.median()),
            "sample_min": float(self.sample_distance.min()),
            "test_median": float(self.test_distance.median()),
            "test_min": float(self.test_distance.min()),
            "closer_than_any_test": float((self.sample_distance < self.test_distance.min()).double().mean()),
        }


def memorisation_check(samples: Tensor, train: Tensor, test: Tensor, chunk: int = 64) -> Neighbours:
    """Nearest training digits of generated ``samples`` and, as the reference scale, of held-out ``test``.

    Args:
        samples: flow samples ``(S, 1, 8, 8)`` in ``(0, 1)`` (:meth:`IUNetFlow.sample`); compared
            on the level scale via :func:`to_levels`.
        train, test: digits' levels ``(N, 1, 8, 8)`` in ``0..16`` (:func:`split_digits`).
    """
    for name, t in (("samples", samples), ("train", train), ("test", test)):
        if t.dim() != 4 or t.shape[1:] != train.shape[1:] or t.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty (N, 1, 8, 8) batch like train "
                             f"{tuple(train.shape)}, got {tuple(t.shape)}")
    if float(samples.min()) < 0 or float(samples.max()) > 1:
        raise ValueError("samples must lie in [0, 1] (flow outputs, not levels); got values in "
                         f"[{float(samples.min()):.3g}, {float(samples.max()):.3g}]")
    d_s, i_s = nearest_neighbours(to_levels(samples), train, chunk)
    d_t, _ = nearest_neighbours(test, train, chunk)
    return Neighbours(d_s, i_s, train[i_s], d_t)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``flow`` task."""
    g = parser.add_argument_group("task 'flow' (normalizing flow on sklearn's digits, bits/dim)")
    g.add_argument("--arch", choices=("iunet", "realnvp"), default="iunet",
                   help="iUNet flow or the FrEIA RealNVP baseline")
    g.add_argument("--blocks", type=int, default=2, help="iUNet blocks (RealNVP: coupling blocks)")
    g.add_argument("--hidden", type=int, default=32, help="width of the coupling subnetworks")
    g.add_argument("--channels", type=int, nargs="+", default=[4, 8, 16])
    g.add_argument("--architecture", type=int, nargs="+", default=[2, 2, 2])


def datasets(opts: argparse.Namespace) -> tuple[TensorDataset, TensorDataset]:
    """Training and held-out digits (integer levels; the loss dequantizes)."""
    train, val = split_digits(opts.seed)
    return TensorDataset(train), TensorDataset(val)


def model(opts: argparse.Namespace) -> nn.Module:
    """``--arch iunet`` (uses the loop's ``--engine``) or ``realnvp`` (FrEIA)."""
    if opts.arch == "realnvp":
        return build_freia_realnvp(opts.blocks, opts.hidden)
    return IUNetFlow(opts.blocks, opts.channels, opts.architecture, opts.hidden,
                     **engine_kwargs(getattr(opts, "engine", "fused")))


#: the task's functions, in the order of :class:`~iunet_nb.apps.task.Task`'s fields
TASK = Task("flow", "normalizing flow on sklearn's 8x8 digits: iUNet flow or FrEIA RealNVP, bits/dim",
            datasets, model, _loss, evaluate, add_arguments)
