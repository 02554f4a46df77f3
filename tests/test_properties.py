"""Property-based tests over the whole space of achievable iUNets (hypothesis).

The strategy draws any achievable model: dim 1-3, 2-4 levels, strides 1-3 per
dimension and level, channels where a level keeps fewer, as many or more
channels than it sends (odd counts, a single kept or sent channel), every
resampling/mixing method and init, mixing frequency -1/0/1/2, learnable flags,
the standard block of depth 1-3 or a user block with BatchNorm and Dropout,
every padding mode, inputs that need padding and batches of 1-3; parameters
are moved off the initialisation; everything in float64.

Properties (both engines):
- outputs, input gradients and every parameter gradient equal plain autograd
  (max abs difference <= 1e-10 times the largest gradient, i.e. after scaling
  the loss so that the gradients are O(1));
- ``inverse(forward(x))`` reconstructs ``x``; ``decode(*encode(x))`` is the forward;
- the caller's input is untouched.

Profiles (registered in ``conftest.py``): ``ci`` (the default; derandomized, 200
examples) and ``thorough`` (``pytest --hypothesis-profile=thorough``, 2,000 examples).
The seeds' models and the original documentation's models are explicit examples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

from iunet_nb.nn.coupling import AdditiveCoupling
from iunet_nb.arch.iunet import iUNet

#: at most this many channels at any level, and this product of the total
#: downsampling factors over the spatial dims (keeps one example ~0.1-1 s)
MAX_CHANNELS = 48
MAX_FACTOR_VOLUME = 512
METHODS = ("exp", "cayley", "householder")
INITS = ("haar", "pixel_shuffle", "squeeze", "random")
PADDING_MODES = ("constant", "reflect", "replicate", "circular")


# ----------------------------------------------------------------------------- a user block
class NormDropoutFunction(nn.Module):
    """``f`` of a user coupling: conv -> BatchNorm -> Dropout -> LeakyReLU -> conv."""

    def __init__(self, c_in: int, c_out: int, dim: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
        self.body = nn.Sequential(conv(c_in, c_out, 3, padding=1), norm(c_out), nn.Dropout(0.2),
                                  nn.LeakyReLU(), conv(c_out, c_out, 1))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.body(v)


def create_norm_dropout_module(in_channels: int, dim: int, module_index: int = 0,
                               **coordinates: Any) -> AdditiveCoupling:
    """A user ``create_module_fn``: additive coupling around :class:`NormDropoutFunction`."""
    split = in_channels // 2 if module_index % 2 else (in_channels + 1) // 2
    return AdditiveCoupling(NormDropoutFunction(in_channels - split, split, dim), in_channels, split)


# ----------------------------------------------------------------------------- configurations
@dataclass
class Case:
    """One drawn model and input: iUNet keyword arguments plus the input's shape."""

    kwargs: dict
    batch: int
    size: tuple[int, ...]
    user_block: bool = False
    scale: float = 0.3
    seed: int = 0
    notes: dict = field(default_factory=dict)

    def build(self) -> iUNet:
        kwargs = dict(self.kwargs)
        if self.user_block:
            kwargs["create_module_fn"] = create_norm_dropout_module
        torch.manual_seed(self.seed)
        model = iUNet(verbose=0, **kwargs).double()
        g = torch.Generator().manual_seed(self.seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(self.scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        return model

    def input(self, model: iUNet) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 2)
        return torch.randn(self.batch, model.channels[0], *self.size, generator=g, dtype=torch.float64)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    dim = draw(st.integers(1, 3), label="dim")
    levels = draw(st.integers(2, 4), label="levels")
    strides: list[tuple[int, ...]] = []
    factors = [1] * dim
    for _ in range(levels - 1):
        s = list(draw(st.tuples(*[st.integers(1, 3)] * dim), label="stride"))
        if all(v == 1 for v in s):  # a stride of 1 everywhere does not downsample
            s[draw(st.integers(0, dim - 1))] = draw(st.integers(2, 3))
        if math.prod(f * v for f, v in zip(factors, s)) > MAX_FACTOR_VOLUME:
            break
        strides.append(tuple(s))
        factors = [f * v for f, v in zip(factors, s)]
    channels = [draw(st.integers(2, 9), label="channels[0]")]
    for s in strides:
        m = math.prod(s)
        most = min(channels[-1] - 1, MAX_CHANNELS // m)
        if most < 1:
            break
        channels.append(m * draw(st.integers(1, most), label="sent"))
    strides = strides[: len(channels) - 1]
    if not strides:  # keep at least one downsampling: 2 levels with stride 2 in dim 0
        strides = [(2,) + (1,) * (dim - 1)]
        channels.append(2 * draw(st.integers(1, channels[0] - 1)))
    n_levels = len(channels)
    factors = [math.prod(s[d] for s in strides) for d in range(dim)]
    stride_spec: Any = [s if len(set(s)) > 1 else s[0] for s in strides]
    if draw(st.booleans()) and len(set(strides)) == 1:
        stride_spec = strides[0]  # one per-dimension tuple for every level
    user_block = draw(st.booleans(), label="user_block")
    kwargs: dict[str, Any] = dict(
        channels=tuple(channels),
        architecture=tuple(draw(st.lists(st.integers(1, 3), min_size=n_levels, max_size=n_levels))),
        dim=dim,
        resampling_stride=stride_spec,
        learnable_resampling=draw(st.booleans()),
        resampling_method=draw(st.sampled_from(METHODS)),
        resampling_init=draw(st.sampled_from(INITS)),
        learnable_channel_mixing=draw(st.booleans()),
        channel_mixing_freq=draw(st.sampled_from((-1, 0, 1, 2))),
        channel_mixing_method=draw(st.sampled_from(METHODS)),
        padding_mode=draw(st.sampled_from(PADDING_MODES)),
        revert_input_padding=draw(st.booleans()),
    )
    if not user_block:
        kwargs["module_kwargs"] = {"depth": draw(st.integers(1, 3))}
    size = [draw(st.integers(max(1, f - f // 2), 2 * f), label="size") for f in factors]
    # At least 4 positions at the coarsest level. GroupNorm/BatchNorm need more than
    # one value per group; with 2 or 3 values they are so ill-conditioned that the
    # round-off of rebuilding activations (1e-16) reaches 1e-9 in the gradients of any
    # memory-efficient engine (see test_regressions.py::test_ill_conditioned_norm...).
    others = math.prod(-(-s // f) for s, f in zip(size[1:], factors[1:]))
    size[0] = max(size[0], factors[0] * (-(-4 // others) - 1) + 1)
    size = tuple(size)
    if kwargs["padding_mode"] == "reflect":  # reflect padding must be smaller than the size
        size = tuple(max(s, (-(-s // f) * f - s) // 2 + 2) for s, f in zip(size, factors))
    # BatchNorm in training mode needs more than one value per channel at the coarsest level.
    batch = draw(st.integers(2 if user_block else 1, 3), label="batch")
    # The user block has no normalisation at its end: larger perturbations make
    # its activations grow by many orders of magnitude over a few levels.
    scales = (0.1, 0.3) if user_block else (0.1, 0.3, 0.6)
    return Case(kwargs, batch, size, user_block,
                scale=draw(st.sampled_from(scales)), seed=draw(st.integers(0, 2**16)))


# Explicit examples: the seeds' models (both API versions) and the original documentation's.
SEED_2D = Case(dict(channels=(64, 128, 256, 384), architecture=(2, 2, 2, 2), dim=2), 1, (8, 8))
SEED_3D = Case(dict(channels=(7, 15, 35, 91), dim=3, architecture=(2, 3, 1, 3), module_kwargs={"depth": 3},
                    resampling_stride=[2, 2, (1, 2, 2)], learnable_resampling=True,
                    resampling_init="haar", resampling_method="cayley", revert_input_padding=True,
                    padding_mode="reflect"), 1, (5, 9, 7))
SEED_OLD_2D = Case(dict(in_channels=64, architecture=(2, 2, 2, 2), dim=2), 1, (8, 8))
SEED_OLD_3D = Case(dict(in_channels=7, dim=3, architecture=(2, 3, 1, 3), module_kwargs={"block_depth": 3},
                        slice_mode="double", resampling_stride=2, learnable_resampling=True,
                        resampling_init="haar", resampling_method="cayley", revert_input_padding=True,
                        padding_mode="reflect"), 1, (8, 9, 10))
# The models of the original package's documentation (docs/ tutorials).
DOCS_TRAINING = Case(dict(in_channels=3, dim=2, architecture=(4, 4, 4, 4, 4)), 1, (16, 16))
DOCS_3D = Case(dict(in_channels=32, dim=3, architecture=(2, 3, 4)), 1, (4, 4, 4))
DOCS_RESAMPLING = Case(dict(channels=(32, 64, 128, 256), dim=3, architecture=(2, 2, 2, 2), resampling_stride=2,
                            resampling_method="exp", resampling_init="haar"), 1, (8, 8, 8))
DOCS_ANISOTROPIC = Case(dict(in_channels=4, dim=3, architecture=(1, 1, 1, 1),
                             resampling_stride=[(2, 1, 3), 2, (4, 3, 1)]), 1, (16, 6, 6))
DOCS_CHANNELS = Case(dict(channels=(3, 25, 32, 55, 128), dim=3, architecture=(2, 2, 2, 2, 2),
                          resampling_stride=[(1, 2, 3), (2, 2, 2), (5, 1, 2), 2]), 1, (20, 8, 24))
# Shrunk counterexamples of the fused engine's old per-part kernel offset bug.
KEPT_LT_SENT = Case(dict(channels=(5, 8), architecture=(2, 1), dim=1), 2, (16,))
KEPT_LT_SENT_NO_MIX = Case(dict(channels=(3, 4), architecture=(2, 1), dim=1, channel_mixing_freq=0), 2, (16,))
EXAMPLES = [SEED_2D, SEED_3D, SEED_OLD_2D, SEED_OLD_3D, DOCS_TRAINING, DOCS_3D, DOCS_RESAMPLING,
            DOCS_ANISOTROPIC, DOCS_CHANNELS, KEPT_LT_SENT, KEPT_LT_SENT_NO_MIX]


def with_examples(test):
    for case in reversed(EXAMPLES):
        test = example(case=case)(test)
    return test


# ----------------------------------------------------------------------------- helpers
def _gradients(model: iUNet, x: torch.Tensor, weight: torch.Tensor, seed: int) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout masks in every engine
    y = model(x)
    (y * weight).sum().backward()
    grads = [y.detach(), x.grad]
    for p in model.parameters():
        grads.append(torch.zeros_like(p) if p.grad is None else p.grad.clone())
    return grads


def _assert_engine_matches_autograd(case: Case, engine: str) -> None:
    model = case.build()
    model.train()
    x = case.input(model)
    x_before = x.clone()
    with torch.no_grad():
        shape = model(x).shape
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(case.seed + 3), dtype=x.dtype)
    model.disable_custom_gradient = True
    reference = _gradients(model, x, weight, case.seed)
    model.disable_custom_gradient = False
    model.me_backend = engine
    got = _gradients(model, x, weight, case.seed)
    assert torch.equal(x, x_before), "the caller's input was modified"
    names = ["output", "input grad"] + [n for n, _ in model.named_parameters()]
    scale = max(1.0, max(g.abs().max().item() for g in reference[1:]))
    for name, a, b in zip(names, reference, got):
        if name == "output":
            err = (a - b).abs().max().item() / max(1.0, a.abs().max().item())
        else:
            err = (a - b).abs().max().item() / scale
        assert err <= 1e-10, f"{engine}: {name} differs from autograd by {err:.3g} (relative)"


# ----------------------------------------------------------------------------- properties
@pytest.mark.slow
@pytest.mark.timeout(7200)  # the thorough profile runs 2,000 examples in one test
@pytest.mark.parametrize("engine", ["fused", "memcnn"])
@with_examples
@given(case=cases())
def test_engine_gradients_equal_autograd(engine: str, case: Case) -> None:
    _assert_engine_matches_autograd(case, engine)


@pytest.mark.slow
@pytest.mark.timeout(7200)
@with_examples
@given(case=cases())
def test_inverse_and_encode_decode(case: Case) -> None:
    model = case.build().eval()
    x = case.input(model)
    x_before = x.clone()
    with torch.no_grad():
        y = model(x)
        x_rec = model.inverse(y)
        codes = model.encode(x)
        y_dec = model.decode(*codes)
    assert torch.equal(x, x_before), "the caller's input was modified"
    # Round-off grows with the largest activation, which may be inside the U.
    scale = max([1.0, y.abs().max().item()] + [c.abs().max().item() for c in codes])
    assert (x_rec - x).abs().max().item() <= 1e-9 * scale
    _, padding = model.get_padding(x)
    if model.revert_input_padding and any(padding):
        y_dec = model._crop(y_dec, padding)
    assert y_dec.shape == y.shape
    assert (y_dec - y).abs().max().item() <= 1e-12 * scale
