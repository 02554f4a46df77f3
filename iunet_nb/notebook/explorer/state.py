"""The explorer's state: :func:`explore` renders an :class:`ExplorerConfig` into an :class:`ExplorerState`.

No widgets, and no model: the layout and parameter count come from :mod:`iunet_nb.arch.layout`, the
memory of one training step from :mod:`iunet_nb.measure.predict`.  :func:`build_and_check` builds the iUNet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping, Optional, Union

import torch

from iunet_nb.arch.iunet import iUNet
from iunet_nb.arch.layout import (Layout, SLICE_MODES, channels_from_slice_mode, compute_layout,
                                  count_parameters)
from iunet_nb.common import GiB, format_bytes
from iunet_nb.measure.predict import MemoryPrediction, largest_fitting, predict_step_memory
from iunet_nb.notebook.explorer.parsing import as_int, parse_input_size, parse_int_list, parse_strides

#: Training modes compared by the explorer, in display order.
MODES = ("conventional", "fused", "memcnn")
#: dtypes offered by the explorer.
DTYPES = ("float32", "float64", "bfloat16")
#: ``iUNet(channels=...)`` or the older ``iUNet(in_channels=..., slice_mode=...)``.
API_MODES = ("channels", "in_channels")

#: ``predict_step_memory(layout, input_shape, dtype, mode, depth=...)``.
Predictor = Callable[..., MemoryPrediction]
ConfigLike = Union["ExplorerConfig", Mapping[str, Any], None]


@dataclass(frozen=True)
class ExplorerConfig:
    """Everything the explorer's controls set.

    Fields of lists may be text as typed in the widgets (``"64, 128, 256"``, see
    :mod:`.parsing`) or Python values (``(64, 128, 256)``).  The input of one training step
    is ``(batch_size, channels[0], *input_size)``.
    """

    dim: int = 2                          # spatial dimensions: 1, 2 or 3
    channels: Any = "64, 128, 256, 384"   # per level, with api='channels'
    architecture: Any = "2, 2, 2, 2"      # coupling layers per side, per level
    strides: Any = "2"                    # resampling_stride
    api: str = "channels"                 # one of API_MODES
    in_channels: int = 64                 # with api='in_channels'
    slice_mode: str = "double"            # with api='in_channels'
    input_size: Any = "256"               # one size for all dimensions or one per dimension
    batch_size: int = 1
    dtype: str = "float32"                # one of DTYPES
    budget_gib: Optional[float] = None    # memory budget (None: none)
    depth: int = 1                        # convolutions per coupling function
    num_levels: Optional[int] = None      # if given, channels/architecture must have as many

    @classmethod
    def of(cls, config: ConfigLike, **overrides: Any) -> "ExplorerConfig":
        """``config`` (a config, a dict of its fields or ``None``: the defaults) with ``overrides``."""
        config = {} if config is None else config
        if not isinstance(config, cls):
            unknown = sorted(set(config) - {f.name for f in fields(cls)})
            if unknown:
                raise TypeError(f"Unknown explorer setting(s) {unknown}; valid: "
                                f"{sorted(f.name for f in fields(cls))}.")
            config = cls(**config)
        return replace(config, **overrides)


@dataclass
class ExplorerState:
    """What the explorer shows for one :class:`ExplorerConfig` (memory in bytes).

    ``error`` is set (and ``layout`` is ``None``) when no layout exists; ``memory_error`` when
    the layout exists but memory cannot be predicted.  ``input_shape`` is
    ``(N, channels[0], *spatial)``, ``padded_shape`` the same padded as the iUNet pads it.
    """

    config: ExplorerConfig
    layout: Optional[Layout] = None
    channels: Optional[tuple[int, ...]] = None
    resampling_stride: Any = None
    layout_text: str = ""
    adjustment_message: Optional[str] = None
    error: Optional[str] = None
    parameters: Optional[int] = None
    parameter_breakdown: dict = field(default_factory=dict)
    input_shape: Optional[tuple[int, ...]] = None
    padded_shape: Optional[tuple[int, ...]] = None
    memory: dict[str, MemoryPrediction] = field(default_factory=dict)
    memory_bytes: dict[str, int] = field(default_factory=dict)
    memory_error: Optional[str] = None
    max_batch_size: dict[str, int] = field(default_factory=dict)
    memory_text: str = ""
    params_text: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether a layout exists for the configuration."""
        return self.error is None and self.layout is not None

    @property
    def message_text(self) -> str:
        """The error, or the adjustment message, or ``''``."""
        return self.error if self.error is not None else self.adjustment_message or ""

    def summary(self) -> str:
        """All texts together, as the explorer shows them."""
        parts = [self.layout_text or "(no layout)", self.message_text, self.params_text, self.memory_text]
        return "\n\n".join(part for part in parts if part)


def error_text(exc: BaseException) -> str:
    """``'ValueError: message'``: how the explorer shows an exception (never a traceback)."""
    return f"{type(exc).__name__}: {exc}"


def _resolve_layout(config: ExplorerConfig) -> tuple[Layout, Any]:
    """``(layout, resampling_stride)`` of ``config``; ``ValueError``/``TypeError`` if none."""
    architecture = parse_int_list(config.architecture, "architecture", "2, 2, 2, 2")
    strides = parse_strides(config.strides)
    if config.api == "channels":
        channels = parse_int_list(config.channels, "channels", "64, 128, 256, 384")
    elif config.api == "in_channels":
        if config.slice_mode not in SLICE_MODES:
            raise ValueError(f"Unknown slice_mode={config.slice_mode!r}; valid "
                             f"values are {', '.join(map(repr, SLICE_MODES))}.")
        channels = channels_from_slice_mode(config.in_channels, architecture, config.dim, strides,
                                            config.slice_mode)
    else:
        raise ValueError(f"api must be one of {API_MODES}, got {config.api!r}.")
    for name, values in (("channels", channels), ("architecture", architecture)):
        if config.num_levels is not None and len(values) != config.num_levels:
            raise ValueError(f"{name} has {len(values)} entries but the number of levels "
                             f"is {config.num_levels}: give one entry per level.")
    return compute_layout(channels, architecture, config.dim, strides), strides


def _layout_state(config: ExplorerConfig) -> ExplorerState:
    """The layout and parameter count of ``config`` (no memory prediction)."""
    state = ExplorerState(config=config)
    try:
        layout, state.resampling_stride = _resolve_layout(config)
        counts = count_parameters(layout, depth=config.depth)
    except (ValueError, TypeError) as exc:
        state.error = error_text(exc)
        return state
    state.layout, state.channels, state.layout_text = layout, layout.channels, layout.text()
    state.adjustment_message = layout.adjustment_message()
    state.parameter_breakdown, state.parameters = counts, counts["total"]
    state.params_text = (f"Learnable parameters: {counts['total']:,d} (coupling {counts['coupling']:,d}, "
                         f"channel mixing {counts['channel_mixing']:,d}, resampling {counts['resampling']:,d})")
    if config.api == "in_channels":
        state.notes.append(f"in_channels={config.in_channels}, slice_mode={config.slice_mode!r} "
                           f"gives channels={layout.channels}.")
    return state


def explore(config: ConfigLike = None, predictor: Predictor = predict_step_memory,
            **overrides: Any) -> ExplorerState:
    """Render ``config`` (see :meth:`ExplorerConfig.of`; default: the reference README's 2D example).

    ``predictor`` is :func:`~iunet_nb.measure.predict.predict_step_memory` or a callable like it.
    Invalid settings never raise: their message is in ``state.error`` (or ``state.memory_error``).
    """
    state = _layout_state(ExplorerConfig.of(config, **overrides))
    if state.ok:
        _predict_memory(state, predictor)
    return state


def _set_input_shape(state: ExplorerState) -> None:
    """Set ``input_shape`` and ``padded_shape`` from the config (``ValueError`` for bad fields)."""
    config, layout = state.config, state.layout
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {config.dtype!r}.")
    batch = as_int(config.batch_size)
    if batch is None or batch < 1:
        raise ValueError(f"batch size must be an int >= 1, got {config.batch_size!r}.")
    spatial = parse_input_size(config.input_size, layout.dim)
    factors = layout.downsampling_factors
    padded = tuple(-(-s // f) * f for s, f in zip(spatial, factors))
    state.input_shape = (batch, layout.channels[0]) + spatial
    state.padded_shape = (batch, layout.channels[0]) + padded
    if padded != spatial:
        state.notes.append(f"The input size {spatial} is not a multiple of the downsampling "
                           f"factors {factors}; the iUNet pads it to {padded}.")


def _predict_memory(state: ExplorerState, predictor: Predictor) -> None:
    """Fill the memory fields of ``state`` for every mode of :data:`MODES` (or ``memory_error``)."""
    config = state.config
    try:
        _set_input_shape(state)
        for mode in MODES:
            state.memory[mode] = predictor(state.layout, state.input_shape, config.dtype, mode,
                                           depth=config.depth)
            state.memory_bytes[mode] = int(state.memory[mode].total)
        if config.budget_gib is not None and config.budget_gib > 0:
            for mode in MODES:
                state.max_batch_size[mode] = _largest_batch(state, predictor, mode,
                                                            int(config.budget_gib * GiB))
    except (ValueError, TypeError, ArithmeticError) as exc:
        state.memory, state.memory_bytes = {}, {}
        state.memory_error = error_text(exc)
        state.memory_text = "Memory: " + state.memory_error
        return
    state.memory_text = _memory_text(state)


def _largest_batch(state: ExplorerState, predictor: Predictor, mode: str, budget: int) -> int:
    """The largest ``N`` whose predicted total fits ``budget`` bytes (0 if even ``N = 1`` does not)."""
    config = state.config

    def fits(n: int) -> bool:
        shape = (n,) + state.input_shape[1:]
        return predictor(state.layout, shape, config.dtype, mode, depth=config.depth).total <= budget

    return largest_fitting(fits)


def _memory_text(state: ExplorerState) -> str:
    """The table of predicted memory per mode, the ratios, the largest batches and the notes."""
    lines = [f"Predicted memory of one training step, input {'x'.join(map(str, state.input_shape))} "
             f"({state.config.dtype}):",
             f"{'mode':<13}{'total':>14}{'bytes':>17}   parameters  gradients      input  activations"]
    for mode, p in state.memory.items():
        lines.append(f"{mode:<13}{p.total / GiB:>10.3f} GiB{int(p.total):>17,d}"
                     f"   {format_bytes(p.parameters):>10} {format_bytes(p.gradients):>10}"
                     f" {format_bytes(p.input):>10}  {format_bytes(p.activations):>11}")
    for mode in ("fused", "memcnn"):
        ratio = state.memory_bytes[mode] / state.memory_bytes["conventional"]
        lines.append(f"{mode} / conventional: {100 * ratio:.1f} %")
    if state.max_batch_size:
        lines.append(f"Largest batch size within {state.config.budget_gib:g} GiB: "
                     + ", ".join(f"{mode} {n}" for mode, n in state.max_batch_size.items()))
    return "\n".join(lines + ["Note: " + note for note in state.notes])


@dataclass
class BuildCheck:
    """Result of :func:`build_and_check`."""

    input_shape: tuple[int, ...]
    dtype: str
    reconstruction_error: float
    relative_error: float
    actual_parameters: int
    predicted_parameters: int
    seconds: float

    @property
    def parameters_match(self) -> bool:
        """Whether the built model has exactly the predicted number of learnable parameters."""
        return self.actual_parameters == self.predicted_parameters

    def text(self) -> str:
        """Three lines: what was run, the reconstruction error, the parameter count."""
        match = ("matches the prediction" if self.parameters_match else
                 f"differs from the predicted {self.predicted_parameters:,d} "
                 f"by {self.actual_parameters - self.predicted_parameters:+,d}")
        return (f"Built the iUNet and ran forward + inverse on a random "
                f"{'x'.join(map(str, self.input_shape))} {self.dtype} input in {self.seconds:.2f} s.\n"
                f"Reconstruction error max|inverse(forward(x)) - x| = "
                f"{self.reconstruction_error:.3g} (relative {self.relative_error:.3g}).\n"
                f"Actual learnable parameters: {self.actual_parameters:,d} ({match}).")


def build_and_check(config: ConfigLike = None, seed: int = 0, **overrides: Any) -> BuildCheck:
    """Build the iUNet for ``config`` and check that it is invertible.

    The input is ``(1, channels[0], *downsampling_factors)`` (the smallest that needs no padding),
    float64 if ``config.dtype`` is and float32 otherwise (bfloat16's rounding would hide the
    reconstruction error).  ``ValueError`` (the explorer's error) if there is no layout.
    """
    state = _layout_state(ExplorerConfig.of(config, **overrides))
    if not state.ok:
        raise ValueError(state.error)
    layout, t0 = state.layout, time.perf_counter()
    dtype = torch.float64 if state.config.dtype == "float64" else torch.float32
    shape = (1, layout.channels[0]) + tuple(layout.downsampling_factors)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = iUNet(channels=layout.channels, architecture=layout.architecture, dim=layout.dim,
                      resampling_stride=state.resampling_stride,
                      module_kwargs={"depth": state.config.depth}, verbose=0).to(dtype).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    with torch.no_grad():
        err = (model.inverse(model(x)) - x).abs().max().item()
    return BuildCheck(input_shape=shape, dtype=str(dtype).replace("torch.", ""), reconstruction_error=err,
                      relative_error=err / max(x.abs().max().item(), 1e-30),
                      actual_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                      predicted_parameters=int(state.parameters), seconds=time.perf_counter() - t0)
