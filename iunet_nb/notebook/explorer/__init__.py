"""An interactive layout explorer for iUNets (ipywidgets), in three modules.

* :mod:`.parsing` -- the text fields -> channels, strides and input sizes;
* :mod:`.state` -- :func:`explore` renders an :class:`ExplorerConfig` into an :class:`ExplorerState`
  (the layout text, the closest-achievable message or a readable error, the parameter count and
  the predicted memory of one training step per mode), without widgets and without building a
  model; :func:`build_and_check` builds the iUNet and checks that it inverts;
* :mod:`.view` -- :class:`LayoutExplorer`, the widgets that show a state on every change::

    state = explore(ExplorerConfig(channels="64, 128, 256, 384", architecture="2, 2, 2, 2", dim=2))
    print(state.layout_text, state.memory_text, sep="\n")
    LayoutExplorer(state.config).display()
"""

from iunet_nb.notebook.explorer.parsing import (parse_input_size, parse_int_list, parse_strides,
                                                resize_int_list_text, resize_strides_text)
from iunet_nb.notebook.explorer.state import (API_MODES, DTYPES, MODES, BuildCheck, ExplorerConfig,
                                              ExplorerState, build_and_check, explore)
from iunet_nb.notebook.explorer.view import LayoutExplorer, memory_figure

__all__ = [
    "MODES", "DTYPES", "API_MODES", "ExplorerConfig", "ExplorerState", "BuildCheck",
    "parse_int_list", "parse_strides", "parse_input_size", "resize_int_list_text",
    "resize_strides_text", "explore", "build_and_check", "memory_figure", "LayoutExplorer",
]
