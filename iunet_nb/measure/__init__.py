"""iunet_nb.measure -- how much memory and time a training step takes.

* :mod:`~iunet_nb.measure.meter` -- measure one step (the allocator's own accounting);
* :mod:`~iunet_nb.measure.predict` -- predict it from the plan without allocating;
* :mod:`~iunet_nb.measure.bench` -- the paper's Table 1 (``python -m iunet_nb.bench table1``);
* :mod:`~iunet_nb.measure.bench3d` -- the largest trainable 3D volume
  (``python -m iunet_nb.bench volume3d``).
"""
