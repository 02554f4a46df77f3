"""iunet_nb.nn."""
