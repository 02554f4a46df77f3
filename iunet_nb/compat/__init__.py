"""Compatibility with the reference package ``iunets`` 0.1 (and its first public API).

The module paths of the reference live at the top of the package
(:mod:`iunet_nb.layers`, :mod:`iunet_nb.networks`, :mod:`iunet_nb.baseline_networks`,
:mod:`iunet_nb.utils`); this sub-package holds what they share:

* :mod:`iunet_nb.compat.reference` -- the reference's orthogonal parametrisation
  (to turn its stored weights into kernels), its order and signs of the Haar
  sub-bands, its standard coupling block and its placement of the decoder's
  channel mixing;
* :mod:`iunet_nb.compat.checkpoints` -- turning state dicts saved from ``iunets``
  objects into this package's format while they are loaded
  (``load_state_dict`` pre-hooks).

Nothing here is a second implementation: every layer is one of the package's
own modules, configured or renamed.
"""
