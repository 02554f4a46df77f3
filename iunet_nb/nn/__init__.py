"""iunet_nb.nn -- the invertible layers (torch modules with ``forward`` and ``inverse``).

* :mod:`~iunet_nb.nn.orthogonal` -- orthogonal matrices from free parameters
  (matrix exponential, Cayley, Householder);
* :mod:`~iunet_nb.nn.resampling` -- learnable orthogonal down-/upsampling
  (Haar/DCT, pixel-shuffle or random initialisation, anisotropic strides);
* :mod:`~iunet_nb.nn.mixing` -- orthogonal 1x1 channel mixing;
* :mod:`~iunet_nb.nn.coupling` -- additive coupling and the standard coupling function;
* :mod:`~iunet_nb.nn.stack`, :mod:`~iunet_nb.nn.wrappers` -- a chain of invertible
  blocks, and a network with non-invertible input/output convolutions around one;
* :mod:`~iunet_nb.nn.conv` -- ``TiledConv``, a non-invertible 3^dim convolution computed
  slab by slab on CPU (for the convolutions around a memory-efficient body);
* :mod:`~iunet_nb.nn.checks` -- ``check_invertible``, the contract every block must meet.
"""
