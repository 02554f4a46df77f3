"""The explorer's view: ipywidgets controls and outputs around :func:`~.state.explore`.

Every text output is an ipywidgets ``HTML`` holding one ``<pre>`` block; the chart is an
``Image``.  Each part has a CSS class by which the browser tests find it: ``iunet-explorer``,
``iunet-layout``, ``iunet-memory``, ``iunet-memory-chart``, ``iunet-build``,
``iunet-build-button`` and ``iunet-<control>`` (e.g. ``iunet-architecture``).
"""

from __future__ import annotations

import html
import io
from typing import Any, Mapping, Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from iunet_nb.arch.layout import SLICE_MODES
from iunet_nb.common import GiB
from iunet_nb.measure.predict import predict_step_memory
from iunet_nb.notebook.explorer.parsing import (channel_multipliers, format_field, parse_int_list,
                                                resize_int_list_text, resize_strides_text)
from iunet_nb.notebook.explorer.state import (DTYPES, BuildCheck, ConfigLike, ExplorerConfig,
                                              ExplorerState, Predictor, build_and_check,
                                              error_text, explore)
from iunet_nb.notebook.plots import bar_chart

#: All of the explorer's markup: its title, and the ``<pre>`` block of every text
#: output with its CSS class and the extra style of that class.
TITLE = ("<b>iUNet layout explorer</b> &mdash; change a setting; "
         "text fields apply on Enter or when they lose focus.")
PRE = ('<pre class="{cls}" style="font-size: 12px; line-height: 1.25; margin: 2px 0; '
       'overflow-x: auto; {style}">{text}</pre>')
PRE_STYLE = {"iunet-error": "color: #b00020; white-space: pre-wrap;",
             "iunet-adjustment": "color: #8a5300;"}
#: Bar colours of the memory chart.
MODE_COLORS = {"conventional": "#c44e52", "fused": "#4c72b0", "memcnn": "#55a868"}

#: Controls whose value is the :class:`ExplorerConfig` field of the same name.
CONFIG_CONTROLS = ("dim", "channels", "architecture", "strides", "api", "in_channels",
                   "slice_mode", "input_size", "batch_size", "dtype", "depth")


def _pre(text: str, cls: str) -> str:
    """``text`` (escaped) as the ``<pre>`` block of CSS class ``cls``."""
    return PRE.format(cls=cls, style=PRE_STYLE.get(cls, ""), text=html.escape(text))


def _classed(widget: Any, cls: str) -> Any:
    """``widget`` with the CSS class ``cls`` added."""
    widget.add_class(cls)
    return widget


def _controls(config: ExplorerConfig) -> dict[str, Any]:
    """The control widgets by name, set to ``config``, each with the CSS class ``iunet-<name>``."""
    import ipywidgets as w

    label = {"description_width": "110px"}

    def text(name: str, description: str, placeholder: str) -> Any:
        return w.Text(value=format_field(getattr(config, name), strides=name == "strides"),
                      description=description, placeholder=placeholder,
                      continuous_update=False, style=label, layout=w.Layout(width="380px"))

    def small(kind: type, value: Any, description: str, **options: Any) -> Any:
        return kind(value=value, description=description, style=label,
                    layout=w.Layout(width="220px"), **options)

    def toggles(options: list, value: Any, description: str, button_width: str) -> Any:
        return w.ToggleButtons(options=options, value=value, description=description,
                               style={**label, "button_width": button_width})

    try:
        levels = len(parse_int_list(format_field(config.architecture)))
    except ValueError:
        levels = 4
    controls = {
        "dim": toggles([("1D", 1), ("2D", 2), ("3D", 3)], config.dim, "Dimensions", "48px"),
        "levels": small(w.BoundedIntText, levels, "Levels", min=1, max=10),
        "api": toggles([("channels=(...)", "channels"), ("in_channels + slice_mode", "in_channels")],
                       config.api, "API", "210px"),
        "channels": text("channels", "Channels", "64, 128, 256, 384"),
        "in_channels": small(w.BoundedIntText, config.in_channels, "in_channels", min=1, max=100000),
        "slice_mode": small(w.Dropdown, config.slice_mode, "slice_mode", options=list(SLICE_MODES)),
        "architecture": text("architecture", "Architecture", "2, 2, 2, 2"),
        "strides": text("strides", "Strides", "2  or  (1, 2, 2)  or  2, 2, (1, 2, 2)"),
        "depth": small(w.BoundedIntText, config.depth, "Block depth", min=1, max=16),
        "input_size": text("input_size", "Input size", "256  or  32, 256, 256"),
        "batch_size": small(w.BoundedIntText, config.batch_size, "Batch size", min=1, max=1_000_000),
        "dtype": small(w.Dropdown, config.dtype, "dtype", options=list(DTYPES)),
        "budget_gib": small(w.BoundedFloatText, float(config.budget_gib or 0.0), "Budget (GiB)",
                            min=0.0, max=1e6, step=1.0, tooltip="0 = no budget"),
    }
    return {name: _classed(ctrl, "iunet-" + name.replace("_", "-")) for name, ctrl in controls.items()}


def memory_figure(state: ExplorerState, figsize: tuple = (4.6, 2.8)) -> Optional[Figure]:
    """A bar chart (GiB) of the predicted memory per mode (``None`` without); no pyplot state."""
    if not state.memory_bytes:
        return None
    fig = Figure(figsize=figsize, dpi=80)
    ax = bar_chart({mode: total / GiB for mode, total in state.memory_bytes.items()},
                   "training-step memory (GiB)", ax=fig.add_subplot(1, 1, 1), fmt="{:.3g}",
                   colors=[MODE_COLORS[mode] for mode in state.memory_bytes])
    budget = state.config.budget_gib
    if budget:
        ax.axhline(budget, color="k", linestyle="--", linewidth=1, label=f"budget {budget:g} GiB")
        ax.legend(loc="upper right", fontsize=8)
        ax.set_ylim(0, max(ax.get_ylim()[1], 1.18 * budget))
    ax.set_xlabel("backpropagation mode")
    ax.set_title("Predicted peak per training step", fontsize=9)
    fig.tight_layout()
    return fig


def _figure_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)  # a Figure made without pyplot needs a canvas to be saved
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


class LayoutExplorer:
    """Interactive iUNet layout explorer, starting from ``config`` (a config or a dict of its fields).

    ``predictor`` is a ``predict_step_memory``-compatible callable.  Attributes: ``widget``
    (the top-level ``VBox``), ``state`` (the :class:`ExplorerState` shown), ``controls`` (the
    control widgets by name: ``'levels'`` and the :data:`CONFIG_CONTROLS`, ``'budget_gib'``),
    ``last_build`` (the last :class:`BuildCheck` or ``None``) and ``build_error`` (the text of
    the last failed build or ``None``).
    """

    def __init__(self, config: ConfigLike = None, predictor: Predictor = predict_step_memory) -> None:
        import ipywidgets as w

        config = ExplorerConfig.of(config)
        self._predictor = predictor
        self._updating = False
        self.last_build: Optional[BuildCheck] = None
        self.build_error: Optional[str] = None
        self.controls = c = _controls(config)
        self.layout_html = _classed(w.HTML(layout=w.Layout(width="100%")), "iunet-layout")
        self.message_html = _classed(w.HTML(layout=w.Layout(width="100%")), "iunet-message")
        self.params_html = _classed(w.HTML(), "iunet-params")
        self.memory_html = _classed(w.HTML(layout=w.Layout(width="100%")), "iunet-memory")
        self.chart = _classed(w.Image(format="png", layout=w.Layout(width="368px")), "iunet-memory-chart")
        self.build_button = _classed(w.Button(
            description="Build and check", button_style="primary", icon="check",
            tooltip="Instantiate the iUNet and run forward + inverse on a tiny input"),
            "iunet-build-button")
        self.build_html = _classed(w.HTML(), "iunet-build")
        self._old_api_box = w.HBox([c["in_channels"], c["slice_mode"]])
        settings = w.VBox([c["dim"], c["api"], w.HBox([c["levels"], c["depth"]]), c["channels"],
                           self._old_api_box, c["architecture"], c["strides"], c["input_size"],
                           w.HBox([c["batch_size"], c["dtype"]]), c["budget_gib"]])
        self.widget = _classed(w.VBox([
            w.HTML(TITLE), settings, self.layout_html, self.message_html, self.params_html,
            self.memory_html, self.chart, w.HBox([self.build_button, self.build_html]),
        ]), "iunet-explorer")
        for ctrl in c.values():
            ctrl.observe(self._on_change, names="value")
        self.build_button.on_click(self._on_build)
        self.state = ExplorerState(config=config)
        self.refresh()

    @property
    def config(self) -> ExplorerConfig:
        """The configuration the controls currently describe."""
        c = self.controls
        budget = c["budget_gib"].value
        return ExplorerConfig(**{name: c[name].value for name in CONFIG_CONTROLS},
                              budget_gib=budget if budget > 0 else None,
                              num_levels=c["levels"].value)

    def refresh(self) -> ExplorerState:
        """Re-render the outputs from the controls; returns the new state."""
        old_api = self.controls["api"].value == "in_channels"
        self._old_api_box.layout.display = None if old_api else "none"
        self.controls["channels"].layout.display = "none" if old_api else None
        self.state = state = explore(self.config, predictor=self._predictor)
        self.layout_html.value = _pre(state.layout_text or "(no layout for these settings)",
                                      "iunet-layout-text")
        message_class = "iunet-error" if state.error else "iunet-adjustment"
        self.message_html.value = _pre(state.message_text, message_class) if state.message_text else ""
        self.params_html.value = html.escape(state.params_text)
        self.memory_html.value = _pre(state.memory_text, "iunet-memory-text") if state.memory_text else ""
        fig = memory_figure(state)
        self.chart.value = b"" if fig is None else _figure_png(fig)
        self.chart.layout.display = "none" if fig is None else None
        self.build_button.disabled = not state.ok
        return state

    def build_and_check(self) -> BuildCheck:
        """What the button does: build, check, show and return the result."""
        self.build_html.value = "building..."
        try:
            result = build_and_check(self.config)
        except Exception as exc:  # shown in the page, not as a traceback
            self.last_build, self.build_error = None, error_text(exc)
            self.build_html.value = _pre(self.build_error, "iunet-error")
            raise
        self.last_build, self.build_error = result, None
        self.build_html.value = _pre(result.text(), "iunet-build-text")
        return result

    def display(self) -> None:
        """Display the explorer in the notebook."""
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _on_build(self, _button: Any) -> None:
        try:
            self.build_and_check()
        except Exception:
            pass  # build_and_check has shown the error in build_html

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
        multipliers = channel_multipliers(c["strides"].value, c["dim"].value, n - 1)
        c["channels"].value = resize_int_list_text(c["channels"].value, n, multipliers)
