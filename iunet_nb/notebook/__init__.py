"""iunet_nb.notebook -- what the notebooks need besides the network.

* :mod:`~iunet_nb.notebook.plots` -- one figure style, labelled axes and units;
* :mod:`~iunet_nb.notebook.data` -- small synthetic data sets;
* :mod:`~iunet_nb.notebook.helpers` -- progress bars, seeding, the memory definition;
* :mod:`~iunet_nb.notebook.training` -- the few-line training loop the notebooks show;
* :mod:`~iunet_nb.notebook.subbands` -- sub-band analysis of a downsampling;
* :mod:`~iunet_nb.notebook.explorer` -- the layout explorer (parsing, state, ipywidgets view).
"""
