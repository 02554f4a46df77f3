"""iunet_nb -- fully invertible U-Nets (iUNets), the package behind the notebooks.

An iUNet (Etmann, Ke & Schönlieb, MLSP 2020) is a U-Net built only from
invertible pieces: additive coupling layers, learnable orthogonal up- and
downsampling and channel splitting/concatenation instead of skip
connections.  Because the whole network is a bijection, activations can be
reconstructed during the backward pass instead of being stored, so training
memory hardly grows with depth.

The notebooks in ``notebooks/`` import everything they need from here.
The reference library ``memcnn`` is imported only through
:func:`iunet_nb.engine.memcnn.import_memcnn`, which leaves ``warnings.filters``
untouched.
"""

__version__ = "0.1.0"

# Public API: add one import per module below, keep ``__all__`` in step.
# (Importing this package must stay free of side effects on warnings.filters;
# tests/test_warnings.py checks it.)

from iunet_nb.nn.checks import check_invertible
from iunet_nb.nn.coupling import AdditiveCoupling, create_memcnn_module, create_standard_module
from iunet_nb.arch.layout import Layout, channels_from_slice_mode, compute_layout
from iunet_nb.nn.mixing import OrthogonalChannelMixing
from iunet_nb.arch.iunet import iUNet
from iunet_nb.nn.orthogonal import METHODS, orthogonal_matrix, orthogonality_error
from iunet_nb.nn.resampling import InvertibleDownsampling, InvertibleUpsampling

__all__ = [
    "__version__",
    "iUNet",
    "check_invertible",
    "AdditiveCoupling",
    "create_standard_module",
    "create_memcnn_module",
    "Layout",
    "compute_layout",
    "channels_from_slice_mode",
    "OrthogonalChannelMixing",
    "InvertibleDownsampling",
    "InvertibleUpsampling",
    "METHODS",
    "orthogonal_matrix",
    "orthogonality_error",
]
