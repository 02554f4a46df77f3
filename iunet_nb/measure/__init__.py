"""iunet_nb.measure."""
