"""iunet_nb.arch -- what the network is.

* :mod:`~iunet_nb.arch.layout` -- channels, kept/sent channels and strides per
  level (plain Python, no torch; ``print_layout`` text);
* :mod:`~iunet_nb.engine.plan` -- the layout as one ordered plan of invertible
  operations, read by everything that needs the network's structure;
* :mod:`~iunet_nb.arch.iunet` -- the :class:`~iunet_nb.arch.iunet.iUNet` module,
  built from the plan, run plainly or by an engine;
* :mod:`~iunet_nb.arch.baselines` -- the conventional U-Net used for comparisons.
"""
