"""An interactive layout explorer for iUNets (ipywidgets).

:class:`LayoutExplorer` lets you pick ``dim``, the number of levels, the
channels and coupling layers per level, the per-level strides, the input
size, batch size, dtype and a memory budget, and shows on every change:

* the layout diagram that ``iUNet.print_layout()`` would print,
* the closest-achievable message when the channels had to be adjusted,
* a readable error (not a traceback) when no layout exists,
* the number of learnable parameters, and
* the predicted memory of one training step for conventional
  backpropagation, the fused memory-efficient engine and memcnn, as text and
  as a bar chart (GiB), with the largest batch size that fits the budget.

None of this builds a torch module: it uses only the pure arithmetic of
:mod:`iunet_nb.arch.layout` and the predictor of :mod:`iunet_nb.measure.predict`.  Only
the *Build and check* button instantiates the :class:`~iunet_nb.arch.iunet.iUNet`,
runs one forward and inverse pass on a tiny random input of shape
``(1, channels[0], *downsampling_factors)`` and compares the reconstruction
error and the actual parameter count with the prediction.

The rendering is split from the widgets so that it can be tested (and used in
a non-interactive notebook) without a frontend::

    state = explore(ExplorerConfig(channels="64, 128, 256, 384",
                                   architecture="2, 2, 2, 2", dim=2))
    print(state.layout_text)
    print(state.memory_text)
    check = build_and_check(state.config)   # builds the model (torch)
"""

from __future__ import annotations

import ast
import html
import io
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from iunet_nb.arch.layout import (
    Layout,
    SLICE_MODES,
    channels_from_slice_mode,
    compute_layout,
    count_parameters,
    normalize_strides,
)


def _prod(values: Sequence[int]) -> int:
    result = 1
    for v in values:
        result *= v
    return result

__all__ = [
    "MODES",
    "DTYPES",
    "ExplorerConfig",
    "ExplorerState",
    "BuildCheck",
    "parse_int_list",
    "parse_strides",
    "parse_input_size",
    "resize_int_list_text",
    "resize_strides_text",
    "explore",
    "build_and_check",
    "memory_figure",
    "LayoutExplorer",
]

#: Training modes compared by the explorer, in display order.
MODES = ("conventional", "fused", "memcnn")
#: dtypes offered by the explorer.
DTYPES = ("float32", "float64", "bfloat16")
#: API modes: ``iUNet(channels=...)`` or the older ``iUNet(in_channels=...,
#: slice_mode=...)``.
API_MODES = ("channels", "in_channels")

GiB = 1024 ** 3
MiB = 1024 ** 2

#: CSS classes of the explorer's parts (for notebooks' styles and browser tests).
CSS = {
    "root": "iunet-explorer",
    "layout": "iunet-layout",
    "message": "iunet-message",
    "params": "iunet-params",
    "memory": "iunet-memory",
    "chart": "iunet-memory-chart",
    "build": "iunet-build",
    "build_button": "iunet-build-button",
}

Predictor = Callable[..., Any]


# --------------------------------------------------------------------------
# Parsing the text fields
# --------------------------------------------------------------------------

def _literal(text: str, what: str, example: str) -> Any:
    try:
        return ast.literal_eval("[" + text + "]")
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(
            f"Could not read {what} {text.strip()!r}: write comma-separated "
            f"numbers, e.g. {example!r}."
        ) from None


def _as_int(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def parse_int_list(value: Union[str, Sequence[int]], what: str = "channels",
                   example: str = "64, 128, 256, 384") -> tuple[int, ...]:
    """``"64, 128, 256"`` (or ``"(64, 128, 256)"``, or a sequence) -> ints.

    Raises:
        ValueError: for anything that is not a non-empty list of integers
            (the message names ``what`` and shows an example).  Positivity
            is left to :func:`iunet_nb.arch.layout.compute_layout`.
    """
    if isinstance(value, str):
        items = _literal(value, what, example)
        if len(items) == 1 and isinstance(items[0], (list, tuple)):
            items = list(items[0])
    else:
        items = list(value)
    if not items:
        raise ValueError(f"{what} is empty: give one number per level, e.g. "
                         f"{example!r}.")
    out = []
    for item in items:
        as_int = _as_int(item)
        if as_int is None:
            raise ValueError(
                f"{what} must be whole numbers, one per level, but got "
                f"{item!r}; e.g. {example!r}."
            )
        out.append(as_int)
    return tuple(out)


def parse_strides(value: Any) -> Any:
    """The strides text -> a ``resampling_stride`` for the layout functions.

    * ``"2"`` -> ``2`` (stride 2 in every dimension at every level);
    * ``"(1, 2, 2)"`` -> ``(1, 2, 2)`` (per dimension, the same at every
      level);
    * ``"2, 2, (1, 2, 2)"`` or ``"[2, 2, (1, 2, 2)]"`` -> ``[2, 2, (1, 2, 2)]``
      (one entry per downsampling).

    Non-strings are returned unchanged.
    """
    if not isinstance(value, str):
        return value
    items = _literal(value, "strides", "2, 2, (1, 2, 2)")
    if not items:
        raise ValueError("strides is empty: write e.g. 2 (the same stride "
                         "everywhere) or 2, 2, (1, 2, 2) (one per downsampling).")

    def convert(entry: Any) -> Any:
        if isinstance(entry, (list, tuple)):
            return tuple(entry)
        return entry

    if len(items) == 1:
        only = items[0]
        if isinstance(only, list):  # "[2, 2, (1,2,2)]": explicitly per level
            return [convert(e) for e in only]
        return convert(only)
    return [convert(e) for e in items]


def parse_input_size(value: Any, dim: int) -> tuple[int, ...]:
    """``"256"`` -> ``(256,) * dim``; ``"32, 256, 256"`` -> per dimension."""
    if isinstance(value, str):
        items = parse_int_list(value, "input size", "256" if dim == 1 else
                               ", ".join(["256"] * dim))
    elif isinstance(value, int) and not isinstance(value, bool):
        items = (value,)
    else:
        items = parse_int_list(value, "input size", "256")
    if len(items) == 1:
        items = items * dim
    if len(items) != dim:
        raise ValueError(
            f"input size {tuple(items)!r} has {len(items)} entries but dim={dim}: "
            f"give one size for all dimensions (e.g. 256) or {dim} sizes."
        )
    for s in items:
        if s < 1:
            raise ValueError(f"input sizes must be >= 1, got {tuple(items)!r}.")
    return tuple(items)


def _format_int_list(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values)


def _format_stride_entry(entry: Any) -> str:
    if isinstance(entry, (list, tuple)):
        return "(" + ", ".join(str(v) for v in entry) + ")"
    return str(entry)


def resize_int_list_text(text: str, n: int,
                         multipliers: Optional[Sequence[int]] = None) -> str:
    """Resize a comma-separated list to ``n`` entries.

    Without ``multipliers`` the last entry is repeated (architecture).  With
    the channel multipliers ``m_i`` of the downsamplings (channels), a new
    level ``i + 1`` gets ``m_i * (c_i // 2)`` channels, i.e. level ``i``
    keeps and sends half of its channels -- always a valid layout.
    Unparsable text is returned unchanged.
    """
    try:
        values = list(parse_int_list(text))
    except ValueError:
        return text
    while len(values) < n:
        if multipliers is None:
            values.append(values[-1])
        else:
            i = len(values) - 1
            m = multipliers[i] if i < len(multipliers) else 2
            values.append(m * max(1, values[-1] // 2))
    return _format_int_list(values[:max(n, 1)])


def resize_strides_text(text: str, num_downsamplings: int) -> str:
    """Resize a per-level strides text to ``num_downsamplings`` entries.

    A single stride (``"2"`` or ``"(1, 2, 2)"``) applies to every level and
    is kept as it is; so is unparsable text.
    """
    try:
        spec = parse_strides(text)
    except ValueError:
        return text
    if not isinstance(spec, list):
        return text
    if num_downsamplings <= 0:
        return "2"
    entries = list(spec) or [2]
    while len(entries) < num_downsamplings:
        entries.append(entries[-1])
    entries = entries[:num_downsamplings]
    if len(entries) == 1:
        # A single entry would read as "all levels": the same thing here.
        return _format_stride_entry(entries[0])
    return ", ".join(_format_stride_entry(e) for e in entries)


# --------------------------------------------------------------------------
# Configuration and rendered state
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class ExplorerConfig:
    """Everything the explorer's controls set.

    Text fields may be strings as typed in the widgets (``"64, 128, 256"``)
    or Python values (``(64, 128, 256)``).

    Attributes:
        dim: spatial dimensions (1, 2 or 3).
        channels: channels per level (``api='channels'``).
        architecture: coupling layers per side, per level.
        strides: ``resampling_stride`` (see :func:`parse_strides`).
        api: ``'channels'`` or ``'in_channels'`` (older API: ``in_channels``
            plus ``slice_mode``).
        in_channels, slice_mode: used when ``api='in_channels'``.
        input_size: spatial size, one int for all dimensions or one per
            dimension (the input is ``(batch_size, channels[0], *size)``).
        batch_size: ``N``.
        dtype: ``'float32'``, ``'float64'`` or ``'bfloat16'``.
        budget_gib: memory budget in GiB (``None``: no budget).
        depth: convolutions per coupling function (``module_kwargs={'depth':
            ...}``).
        num_levels: if given, channels/architecture must have this many
            entries.
    """

    dim: int = 2
    channels: Any = "64, 128, 256, 384"
    architecture: Any = "2, 2, 2, 2"
    strides: Any = "2"
    api: str = "channels"
    in_channels: int = 64
    slice_mode: str = "double"
    input_size: Any = "256"
    batch_size: int = 1
    dtype: str = "float32"
    budget_gib: Optional[float] = None
    depth: int = 1
    num_levels: Optional[int] = None

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "ExplorerConfig":
        """Build a config from a dict, rejecting unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise TypeError(f"Unknown explorer setting(s) {unknown}; valid: "
                            f"{sorted(known)}.")
        return cls(**dict(mapping))


@dataclass
class ExplorerState:
    """What the explorer shows for one :class:`ExplorerConfig`.

    ``error`` is set (and ``layout`` is ``None``) when no layout exists;
    ``memory_error`` when the layout exists but memory cannot be predicted.
    Memory figures are bytes.
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
    memory: dict = field(default_factory=dict)
    memory_bytes: dict = field(default_factory=dict)
    memory_error: Optional[str] = None
    max_batch_size: dict = field(default_factory=dict)
    memory_text: str = ""
    params_text: str = ""
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether a layout exists for the configuration."""
        return self.error is None and self.layout is not None

    @property
    def message_text(self) -> str:
        """The error, or the adjustment message, or ``''``."""
        if self.error is not None:
            return self.error
        return self.adjustment_message or ""

    def summary(self) -> str:
        """All texts together, as the explorer shows them."""
        parts = [self.layout_text or "(no layout)"]
        if self.message_text:
            parts.append(self.message_text)
        if self.params_text:
            parts.append(self.params_text)
        if self.memory_text:
            parts.append(self.memory_text)
        return "\n\n".join(parts)


def _default_predictor() -> Predictor:
    from iunet_nb.measure.predict import predict_step_memory  # pure arithmetic, no model built

    return predict_step_memory


def _predictor_module_max_batch_size() -> Optional[Callable[..., Any]]:
    try:
        from iunet_nb.measure import predict
    except ImportError:
        return None
    return getattr(predict, "max_batch_size", None)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _resolve_layout(config: ExplorerConfig) -> tuple[Layout, tuple[int, ...], Any]:
    """Parse the config and compute the layout (raises ValueError/TypeError)."""
    dim = config.dim
    architecture = parse_int_list(config.architecture, "architecture",
                                  "2, 2, 2, 2")
    strides = parse_strides(config.strides)
    if config.api == "channels":
        channels = parse_int_list(config.channels, "channels",
                                  "64, 128, 256, 384")
    elif config.api == "in_channels":
        if config.slice_mode not in SLICE_MODES:
            raise ValueError(f"Unknown slice_mode={config.slice_mode!r}; valid "
                             f"values are {', '.join(map(repr, SLICE_MODES))}.")
        channels = channels_from_slice_mode(config.in_channels, architecture,
                                            dim, strides, config.slice_mode)
    else:
        raise ValueError(f"api must be one of {API_MODES}, got {config.api!r}.")
    if config.num_levels is not None:
        for name, values in (("channels", channels),
                             ("architecture", architecture)):
            if len(values) != config.num_levels:
                raise ValueError(
                    f"{name} has {len(values)} entries but the number of levels "
                    f"is {config.num_levels}: give one entry per level."
                )
    layout = compute_layout(channels, architecture, dim, strides)
    return layout, channels, strides


def _fmt_bytes(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def _search_max_batch(predict: Predictor, layout: Layout, spatial: tuple,
                      channels0: int, dtype: str, mode: str, budget: int,
                      **kw: Any) -> int:
    """Largest ``N`` with predicted total <= budget (0 if even N=1 fails)."""
    from iunet_nb.measure.predict import largest_fitting

    return largest_fitting(
        lambda n: predict(layout, (n, channels0) + spatial, dtype, mode, **kw).total <= budget)


def explore(config: Union[ExplorerConfig, Mapping[str, Any], None] = None,
            predictor: Optional[Predictor] = None,
            **overrides: Any) -> ExplorerState:
    """Render one configuration without building a model.

    Args:
        config: an :class:`ExplorerConfig` or a dict of its fields (default:
            the reference README's 2D example ``channels=(64, 128, 256, 384)``,
            ``architecture=(2, 2, 2, 2)``).
        predictor: ``predict_step_memory``-compatible callable (default:
            :func:`iunet_nb.measure.predict.predict_step_memory`).
        **overrides: fields replacing those of ``config``.

    Returns:
        An :class:`ExplorerState`.  Invalid settings never raise: their
        message is in ``state.error`` (or ``state.memory_error``).
    """
    if config is None:
        config = ExplorerConfig()
    elif not isinstance(config, ExplorerConfig):
        config = ExplorerConfig.from_mapping(config)
    if overrides:
        config = replace(config, **overrides)
    state = ExplorerState(config=config)

    try:
        layout, channels, strides = _resolve_layout(config)
    except (ValueError, TypeError) as exc:
        state.error = _error_text(exc)
        return state
    state.layout = layout
    state.channels = layout.channels
    state.resampling_stride = strides
    state.layout_text = layout.text()
    state.adjustment_message = layout.adjustment_message()

    try:
        breakdown = count_parameters(layout, depth=config.depth)
    except (ValueError, TypeError) as exc:
        state.error = _error_text(exc)
        return state
    state.parameter_breakdown = breakdown
    state.parameters = breakdown["total"]
    state.params_text = (
        f"Learnable parameters: {breakdown['total']:,d} "
        f"(coupling {breakdown['coupling']:,d}, channel mixing "
        f"{breakdown['channel_mixing']:,d}, resampling "
        f"{breakdown['resampling']:,d})"
    )
    if config.api == "in_channels":
        state.notes.append(
            f"in_channels={config.in_channels}, slice_mode="
            f"{config.slice_mode!r} gives channels={layout.channels}."
        )

    _render_memory(state, predictor)
    return state


def _render_memory(state: ExplorerState, predictor: Optional[Predictor]) -> None:
    config, layout = state.config, state.layout
    try:
        if config.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {config.dtype!r}.")
        batch = _as_int(config.batch_size)
        if batch is None or batch < 1:
            raise ValueError(f"batch size must be an int >= 1, got "
                             f"{config.batch_size!r}.")
        spatial = parse_input_size(config.input_size, layout.dim)
    except (ValueError, TypeError) as exc:
        state.memory_error = _error_text(exc)
        state.memory_text = "Memory: " + state.memory_error
        return
    state.input_shape = (batch, layout.channels[0]) + spatial
    factors = layout.downsampling_factors
    padded = tuple(-(-s // f) * f for s, f in zip(spatial, factors))
    state.padded_shape = (batch, layout.channels[0]) + padded
    if padded != spatial:
        state.notes.append(
            f"The input size {spatial} is not a multiple of the downsampling "
            f"factors {factors}; the iUNet pads it to {padded}."
        )

    try:
        predict = predictor if predictor is not None else _default_predictor()
    except ImportError as exc:
        state.memory_error = f"Memory predictor not available ({exc})."
        state.memory_text = "Memory: " + state.memory_error
        return

    kw = dict(depth=config.depth)
    try:
        for mode in MODES:
            pred = predict(layout, state.input_shape, config.dtype, mode, **kw)
            state.memory[mode] = pred
            state.memory_bytes[mode] = int(pred.total)
        budget = config.budget_gib
        if budget is not None and budget > 0:
            budget_bytes = int(budget * GiB)
            offered = _predictor_module_max_batch_size() if predictor is None else None
            for mode in MODES:
                n = None
                if offered is not None:
                    try:
                        n = int(offered(layout, state.input_shape,
                                        dtype=config.dtype, mode=mode,
                                        budget_bytes=budget_bytes, **kw))
                    except TypeError:
                        n = None
                if n is None:
                    n = _search_max_batch(predict, layout, spatial,
                                          layout.channels[0], config.dtype,
                                          mode, budget_bytes, **kw)
                state.max_batch_size[mode] = n
    except (ValueError, TypeError, ArithmeticError) as exc:
        state.memory = {}
        state.memory_bytes = {}
        state.memory_error = _error_text(exc)
        state.memory_text = "Memory: " + state.memory_error
        return
    state.memory_text = _memory_text(state)


def _memory_text(state: ExplorerState) -> str:
    cfg = state.config
    shape = "x".join(str(s) for s in state.input_shape)
    lines = [
        f"Predicted memory of one training step, input {shape} ({cfg.dtype}):",
        f"{'mode':<13}{'total':>14}{'bytes':>17}   parameters  gradients"
        f"      input  activations",
    ]
    for mode, pred in state.memory.items():
        inp = getattr(pred, "input", None)
        lines.append(
            f"{mode:<13}{pred.total / GiB:>10.3f} GiB{int(pred.total):>17,d}"
            f"   {_fmt_bytes(pred.parameters):>10} {_fmt_bytes(pred.gradients):>10}"
            f" {_fmt_bytes(inp) if inp is not None else '-':>10}"
            f"  {_fmt_bytes(pred.activations):>11}"
        )
    conv = state.memory_bytes.get("conventional")
    if conv:
        for mode in ("fused", "memcnn"):
            if mode in state.memory_bytes:
                lines.append(f"{mode} / conventional: "
                             f"{100 * state.memory_bytes[mode] / conv:.1f} %")
    if state.max_batch_size:
        lines.append(f"Largest batch size within {cfg.budget_gib:g} GiB: " + ", ".join(
            f"{mode} {n}" for mode, n in state.max_batch_size.items()))
    for note in state.notes:
        lines.append("Note: " + note)
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Chart
# --------------------------------------------------------------------------

def memory_figure(state: ExplorerState, figsize: tuple = (4.6, 2.8)):
    """A bar chart (GiB) of the predicted memory per mode, or ``None``.

    Uses :class:`matplotlib.figure.Figure` directly (no pyplot state).
    """
    if not state.memory_bytes:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=80)
    ax = fig.add_subplot(1, 1, 1)
    modes = list(state.memory_bytes)
    values = [state.memory_bytes[m] / GiB for m in modes]
    colors = {"conventional": "#c44e52", "fused": "#4c72b0", "memcnn": "#55a868"}
    bars = ax.bar(modes, values, color=[colors.get(m, "#888888") for m in modes])
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v),
                    ha="center", va="bottom", fontsize=8)
    budget = state.config.budget_gib
    if budget:
        ax.axhline(budget, color="k", linestyle="--", linewidth=1,
                   label=f"budget {budget:g} GiB")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylabel("training-step memory (GiB)")
    ax.set_xlabel("backpropagation mode")
    ax.set_ylim(0, max(values + [budget or 0]) * 1.18 or 1)
    ax.set_title("Predicted peak per training step", fontsize=9)
    fig.tight_layout()
    return fig


def _figure_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------
# Build and check (the only part that builds torch modules)
# --------------------------------------------------------------------------

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
        return self.actual_parameters == self.predicted_parameters

    def text(self) -> str:
        shape = "x".join(str(s) for s in self.input_shape)
        match = ("matches the prediction" if self.parameters_match else
                 f"differs from the predicted {self.predicted_parameters:,d} "
                 f"by {self.actual_parameters - self.predicted_parameters:+,d}")
        return (
            f"Built the iUNet and ran forward + inverse on a random {shape} "
            f"{self.dtype} input in {self.seconds:.2f} s.\n"
            f"Reconstruction error max|inverse(forward(x)) - x| = "
            f"{self.reconstruction_error:.3g} (relative {self.relative_error:.3g}).\n"
            f"Actual learnable parameters: {self.actual_parameters:,d} ({match})."
        )


def build_and_check(config: Union[ExplorerConfig, Mapping[str, Any], None] = None,
                    seed: int = 0, **overrides: Any) -> BuildCheck:
    """Build the iUNet for ``config`` and check that it is invertible.

    The input is ``(1, channels[0], *downsampling_factors)`` -- the smallest
    size that needs no padding -- in ``float64`` if ``config.dtype`` is
    ``'float64'`` and ``float32`` otherwise (bfloat16 would hide the
    reconstruction error in rounding).

    Raises:
        ValueError: if the configuration has no layout (the explorer's error).
    """
    import torch

    from iunet_nb.arch.iunet import iUNet

    state = explore(config, predictor=_no_predictor, **overrides)
    if not state.ok:
        raise ValueError(state.error)
    cfg, layout = state.config, state.layout
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    shape = (1, layout.channels[0]) + tuple(layout.downsampling_factors)
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = iUNet(channels=layout.channels, architecture=layout.architecture,
                      dim=layout.dim, resampling_stride=state.resampling_stride,
                      module_kwargs={"depth": cfg.depth}, verbose=0)
    model = model.to(dtype).eval()
    x = torch.randn(shape, generator=generator, dtype=dtype)
    with torch.no_grad():
        y = model(x)
        x_rec = model.inverse(y)
    err = (x_rec - x).abs().max().item()
    rel = err / max(x.abs().max().item(), 1e-30)
    actual = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return BuildCheck(
        input_shape=shape,
        dtype=str(dtype).replace("torch.", ""),
        reconstruction_error=err,
        relative_error=rel,
        actual_parameters=int(actual),
        predicted_parameters=int(state.parameters),
        seconds=time.perf_counter() - t0,
    )


class _NoMemory:
    total = parameters = gradients = activations = peak_step = 0


def _no_predictor(*args: Any, **kwargs: Any) -> _NoMemory:
    return _NoMemory()


# --------------------------------------------------------------------------
# The widget
# --------------------------------------------------------------------------

def _pre(text: str, cls: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return (f'<pre{klass} style="font-family: monospace; font-size: 12px; '
            f'line-height: 1.25; margin: 2px 0; white-space: pre; '
            f'overflow-x: auto;">{html.escape(text)}</pre>')


class LayoutExplorer:
    """Interactive iUNet layout explorer (see the module docstring).

    Args:
        config: initial :class:`ExplorerConfig` (or dict of its fields).
        predictor: ``predict_step_memory``-compatible callable (default:
            :func:`iunet_nb.measure.predict.predict_step_memory`).

    Attributes:
        widget: the top-level ``ipywidgets.VBox``.
        state: the :class:`ExplorerState` currently shown.
        last_build: the last :class:`BuildCheck` (or ``None``).
        controls: dict of the control widgets by name (``'dim'``,
            ``'levels'``, ``'channels'``, ``'architecture'``, ``'strides'``,
            ``'api'``, ``'in_channels'``, ``'slice_mode'``, ``'input_size'``,
            ``'batch_size'``, ``'dtype'``, ``'budget_gib'``, ``'depth'``).
    """

    def __init__(self, config: Union[ExplorerConfig, Mapping[str, Any], None] = None,
                 predictor: Optional[Predictor] = None) -> None:
        import ipywidgets as w

        if config is None:
            config = ExplorerConfig()
        elif not isinstance(config, ExplorerConfig):
            config = ExplorerConfig.from_mapping(config)
        self._predictor = predictor
        self._updating = False
        self.last_build: Optional[BuildCheck] = None
        self.build_error: Optional[str] = None

        def text_value(v: Any, kind: str) -> str:
            if isinstance(v, str):
                return v
            if kind == "strides":
                if isinstance(v, list):
                    return ", ".join(_format_stride_entry(e) for e in v)
                return _format_stride_entry(v)
            if isinstance(v, int):
                return str(v)
            return _format_int_list(v)

        arch_text = text_value(config.architecture, "ints")
        try:
            n_levels = len(parse_int_list(arch_text))
        except ValueError:
            n_levels = 4
        style = {"description_width": "110px"}
        wide = w.Layout(width="380px")
        narrow = w.Layout(width="220px")

        c: dict[str, Any] = {}
        c["dim"] = w.ToggleButtons(options=[("1D", 1), ("2D", 2), ("3D", 3)],
                                   value=config.dim, description="Dimensions",
                                   style={"description_width": "110px",
                                          "button_width": "48px"})
        c["levels"] = w.BoundedIntText(value=n_levels, min=1, max=10,
                                       description="Levels", style=style,
                                       layout=narrow)
        c["api"] = w.ToggleButtons(
            options=[("channels=(...)", "channels"),
                     ("in_channels + slice_mode", "in_channels")],
            value=config.api, description="API",
            style={"description_width": "110px", "button_width": "210px"})
        c["channels"] = w.Text(value=text_value(config.channels, "ints"),
                               description="Channels",
                               placeholder="64, 128, 256, 384",
                               continuous_update=False, style=style, layout=wide)
        c["in_channels"] = w.BoundedIntText(value=config.in_channels, min=1,
                                            max=100000, description="in_channels",
                                            style=style, layout=narrow)
        c["slice_mode"] = w.Dropdown(options=list(SLICE_MODES),
                                     value=config.slice_mode,
                                     description="slice_mode", style=style,
                                     layout=narrow)
        c["architecture"] = w.Text(value=arch_text, description="Architecture",
                                   placeholder="2, 2, 2, 2",
                                   continuous_update=False, style=style,
                                   layout=wide)
        c["strides"] = w.Text(value=text_value(config.strides, "strides"),
                              description="Strides",
                              placeholder="2  or  (1, 2, 2)  or  2, 2, (1, 2, 2)",
                              continuous_update=False, style=style, layout=wide)
        c["depth"] = w.BoundedIntText(value=config.depth, min=1, max=16,
                                      description="Block depth", style=style,
                                      layout=narrow)
        c["input_size"] = w.Text(value=text_value(config.input_size, "ints"),
                                 description="Input size",
                                 placeholder="256  or  32, 256, 256",
                                 continuous_update=False, style=style,
                                 layout=wide)
        c["batch_size"] = w.BoundedIntText(value=config.batch_size, min=1,
                                           max=1_000_000, description="Batch size",
                                           style=style, layout=narrow)
        c["dtype"] = w.Dropdown(options=list(DTYPES), value=config.dtype,
                                description="dtype", style=style, layout=narrow)
        c["budget_gib"] = w.BoundedFloatText(
            value=float(config.budget_gib or 0.0), min=0.0, max=1e6, step=1.0,
            description="Budget (GiB)", tooltip="0 = no budget",
            style=style, layout=narrow)
        for name, ctrl in c.items():
            ctrl.add_class(f"iunet-{name.replace('_', '-')}")
        self.controls = c

        self.layout_html = w.HTML(layout=w.Layout(width="100%"))
        self.layout_html.add_class(CSS["layout"])
        self.message_html = w.HTML(layout=w.Layout(width="100%"))
        self.message_html.add_class(CSS["message"])
        self.params_html = w.HTML()
        self.params_html.add_class(CSS["params"])
        self.memory_html = w.HTML(layout=w.Layout(width="100%"))
        self.memory_html.add_class(CSS["memory"])
        self.chart = w.Image(format="png", layout=w.Layout(width="368px"))
        self.chart.add_class(CSS["chart"])
        self.build_button = w.Button(description="Build and check",
                                     button_style="primary", icon="check",
                                     tooltip="Instantiate the iUNet and run "
                                             "forward + inverse on a tiny input")
        self.build_button.add_class(CSS["build_button"])
        self.build_html = w.HTML()
        self.build_html.add_class(CSS["build"])

        self._old_api_box = w.HBox([c["in_channels"], c["slice_mode"]])
        controls = w.VBox([
            c["dim"], c["api"],
            w.HBox([c["levels"], c["depth"]]),
            c["channels"], self._old_api_box,
            c["architecture"], c["strides"],
            c["input_size"],
            w.HBox([c["batch_size"], c["dtype"]]),
            c["budget_gib"],
        ])
        self.widget = w.VBox([
            w.HTML("<b>iUNet layout explorer</b> &mdash; change a setting; "
                   "text fields apply on Enter or when they lose focus."),
            controls,
            self.layout_html,
            self.message_html,
            self.params_html,
            w.HBox([self.memory_html], layout=w.Layout(width="100%")),
            self.chart,
            w.HBox([self.build_button, self.build_html]),
        ])
        self.widget.add_class(CSS["root"])

        for name, ctrl in c.items():
            ctrl.observe(self._on_change, names="value")
        self.build_button.on_click(self._on_build)
        self.state: ExplorerState = ExplorerState(config=config)
        self.refresh()

    # -- public -----------------------------------------------------------

    @property
    def config(self) -> ExplorerConfig:
        """The configuration the controls currently describe."""
        c = self.controls
        budget = c["budget_gib"].value
        return ExplorerConfig(
            dim=c["dim"].value,
            channels=c["channels"].value,
            architecture=c["architecture"].value,
            strides=c["strides"].value,
            api=c["api"].value,
            in_channels=c["in_channels"].value,
            slice_mode=c["slice_mode"].value,
            input_size=c["input_size"].value,
            batch_size=c["batch_size"].value,
            dtype=c["dtype"].value,
            budget_gib=budget if budget and budget > 0 else None,
            depth=c["depth"].value,
            num_levels=c["levels"].value,
        )

    def refresh(self) -> ExplorerState:
        """Re-render the outputs from the controls; returns the new state."""
        old_api = self.controls["api"].value == "in_channels"
        self._old_api_box.layout.display = None if old_api else "none"
        self.controls["channels"].layout.display = "none" if old_api else None
        state = explore(self.config, predictor=self._predictor)
        self.state = state
        self.layout_html.value = _pre(state.layout_text or
                                      "(no layout for these settings)",
                                      "iunet-layout-text")
        if state.error:
            self.message_html.value = (
                '<div class="iunet-error" style="color: #b00020; '
                'white-space: pre-wrap; font-family: monospace; '
                f'font-size: 12px;">{html.escape(state.error)}</div>')
        elif state.adjustment_message:
            self.message_html.value = (
                '<div class="iunet-adjustment" style="color: #8a5300;">'
                + _pre(state.adjustment_message) + "</div>")
        else:
            self.message_html.value = ""
        self.params_html.value = (
            f'<span class="iunet-params-text">{html.escape(state.params_text)}'
            "</span>" if state.params_text else "")
        self.memory_html.value = _pre(state.memory_text, "iunet-memory-text") \
            if state.memory_text else ""
        fig = memory_figure(state)
        if fig is None:
            self.chart.value = b""
            self.chart.layout.display = "none"
        else:
            self.chart.value = _figure_png(fig)
            self.chart.layout.display = None
        self.build_button.disabled = not state.ok
        return state

    def build_and_check(self) -> BuildCheck:
        """What the button does: build, check, show and return the result."""
        self.build_html.value = "<i>building...</i>"
        try:
            result = build_and_check(self.config)
        except Exception as exc:  # shown in the page, not as a traceback
            self.last_build = None
            self.build_error = _error_text(exc)
            self.build_html.value = (
                '<div class="iunet-error" style="color: #b00020;">'
                f"{html.escape(self.build_error)}</div>")
            raise
        self.last_build = result
        self.build_error = None
        self.build_html.value = _pre(result.text(), "iunet-build-text")
        return result

    def display(self) -> None:
        """Display the explorer in the notebook."""
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # -- callbacks ----------------------------------------------------------

    def _on_build(self, _button: Any) -> None:
        try:
            self.build_and_check()
        except Exception:
            pass  # already shown in build_html

    def _on_change(self, change: Mapping[str, Any]) -> None:
        if self._updating:
            return
        self._updating = True
        try:
            self._sync_levels(change)
        finally:
            self._updating = False
        self.build_html.value = ""
        self.refresh()

    def _sync_levels(self, change: Mapping[str, Any]) -> None:
        """Keep the per-level fields and the number of levels consistent."""
        c = self.controls
        owner = change.get("owner")
        if owner is c["levels"]:
            n = c["levels"].value
        elif owner is c["channels"] or owner is c["architecture"]:
            try:
                n = len(parse_int_list(owner.value))
            except ValueError:
                return
            c["levels"].value = n
        else:
            return
        c["architecture"].value = resize_int_list_text(c["architecture"].value, n)
        c["strides"].value = resize_strides_text(c["strides"].value, n - 1)
        try:
            multipliers = [_prod(s) for s in normalize_strides(
                parse_strides(c["strides"].value), c["dim"].value, n - 1)]
        except (ValueError, TypeError):
            multipliers = [2 ** c["dim"].value] * (n - 1)
        c["channels"].value = resize_int_list_text(c["channels"].value, n,
                                                   multipliers)
