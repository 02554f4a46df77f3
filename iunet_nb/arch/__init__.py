"""iunet_nb.arch."""
